"""Data: knowledge sets, text corpora and question sets (built-in files, local paths, the hub).

The kinds of data option (`data.kind`, the schema its YAML starts from: facts, corpus, muse) and
what each gives the stages are written here once; the readers branch on the kind.
"""

KINDS = ("facts", "corpus", "muse")
# the eval option that scores a data kind (`data=X` alone picks it)
EVAL_FOR_KIND = {"facts": "facts", "corpus": "wmdp", "muse": "muse"}
# the splits kuda unlearn trains on (corpus and muse; facts split their domains)
UNLEARN_SPLITS = ("forget", "retain")


def probe_split(data) -> str | None:
    """The split the tracing probes of `data` (a data config node) come from: `probes` when it
    names a path or a hub_id (questions held apart from the evaluation), else `forget` (cloze
    probes from the forget corpus); None for facts (the forget facts' own prompts). Never the
    evaluation questions (corpus: data.questions, muse: data.knowmem_forget): layers chosen on
    them would be chosen on the test set."""
    if data.kind not in ("corpus", "muse"):
        return None
    probes = data.get("probes")
    if probes is not None and (probes.get("path") or probes.get("hub_id")):
        return "probes"
    return "forget"
