"""Data: knowledge sets, text corpora and question sets (built-in files, local paths, the hub).

The kinds of data option (`data.kind`, the schema its YAML starts from: facts, corpus, muse) and
what each gives the stages are written here once; the readers branch on the kind.
"""

KINDS = ("facts", "corpus", "muse")
# the eval option that scores a data kind (`data=X` alone picks it)
EVAL_FOR_KIND = {"facts": "facts", "corpus": "wmdp", "muse": "muse"}
# the split tracing probes come from (facts: the forget facts' own prompts)
PROBE_SPLIT = {"corpus": "questions", "muse": "knowmem_forget"}
# the splits kuda unlearn trains on (corpus and muse; facts split their domains)
UNLEARN_SPLITS = ("forget", "retain")
