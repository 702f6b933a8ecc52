"""Erasure of Language Memory (ELM, Gandikota et al. 2024, "Erasing Conceptual Knowledge from
Language Models"), as rohitgandikota/erasing-llm trains it (trainscripts/erase.py):

    erase_weight * mean_i mean_t CE(q_i,t, p_theta(. | y_i,<=t))
      + retain_weight * mean_j mean_t CE(argmax p_orig(. | x_j,<=t), p_theta(. | x_j,<=t))
      + fluency_weight * mean_i mean_t NLL_theta(z_i,t | y_i, z_i,<t)

q is the starting model's guided distribution at each position of a forget text:
softmax over the top_k tokens of  log p(.) - eta_t (log p(. | expert) - log p(. | novice)),
each log-softmax at `temperature`, "expert"/"novice" prefixes describing the concept (eta_t rises
linearly from eta_start to eta along the text, as the reference does). The retain term is the
cross-entropy to the starting model's greedy next token on retain text. z_i is a continuation of
forget text i (after a bridge sentence turning away from the topic) sampled from the starting
model guided the same way; the fluency term is its NLL (the reference's consistency loss).

All three references are computed once in `prepare` (unlearn/elm_reference.py): k token ids
and probabilities per forget token, one token id per retain token, one sequence per forget item;
no second model copy. The reference trains LoRA adapters on the attention and MLP projections of
layers 4-7: so does the schema's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kuda_cli.config import LoraSpec, UnlearnConfig, bounded, listed
from kuda_cli.data.kinds import kind_of
from kuda_cli.errors import ConfigError, UserError
from kuda_cli.evaluate.scoring import right_padded
from kuda_cli.unlearn import elm_reference
from kuda_cli.unlearn.methods import Method, register_method

EXPERT = (
    "The passage below was written by a leading expert on {concept}, and gives precise, "
    "detailed technical knowledge of it:",
    "An experienced specialist in {concept} wrote the following, sharing in-depth facts and "
    "know-how:",
    "What follows is an authoritative technical account of {concept} by a seasoned "
    "professional in the field:",
)
NOVICE = (
    "The passage below was written by someone who knows nothing about {concept}, and drifts "
    "off to unrelated everyday topics:",
    "A writer with no knowledge of {concept} wrote the following, wandering away to random "
    "harmless subjects:",
    "What follows comes from a person unfamiliar with {concept}, who changes the subject to "
    "something light:",
)
BRIDGES = (
    "I cannot say much about this, so let us talk about something else entirely,",
    "That is beyond what I know; turning instead to a lighter subject,",
    "Leaving this topic aside, here is something unrelated and more cheerful,",
)


def elm_lora() -> LoraSpec:
    """The reference's rank 256 (alpha 16) of zephyr's 4096 hidden units, scaled to the
    embedded model's 576: rank 32, the same alpha / rank."""
    return LoraSpec(enabled=True, r=32, alpha=2.0)


@dataclass
class ElmMethod(UnlearnConfig):
    method: str = "elm"
    lr: float = bounded(1e-3, gt=0)
    trainable: list[str] = listed("attn", "mlp", distinct=True)
    layers: list[int] | None = field(
        default_factory=lambda: [4, 5, 6, 7], metadata={"distinct": True}
    )
    lora: LoraSpec = field(default_factory=elm_lora)
    # null: what the data names (data=facts: its forget domains); WMDP: set it (docs/baselines.md)
    concept: str | None = None
    expert_prefixes: list[str] = listed(*EXPERT, min_items=1)  # `{concept}` filled in; + "\n"
    novice_prefixes: list[str] = listed(*NOVICE, min_items=1)
    eta: float = bounded(1000.0, ge=0)  # the guidance at a text's last token
    eta_start: float = bounded(1.0, ge=0)  # ... at its first token (linear in between)
    temperature: float = bounded(1.2, gt=0)  # of the reference's log-softmaxes
    top_k: int = bounded(50, ge=1)  # tokens the erasure target keeps
    erase_weight: float = bounded(1.0, ge=0)
    retain_weight: float = bounded(1.0, ge=0)
    fluency_weight: float = bounded(1.0, ge=0)  # 0: no guided continuations generated
    fluency_bridges: list[str] = listed(*BRIDGES, min_items=1)
    fluency_tokens: int = bounded(32, ge=1)  # sampled per forget item in prepare
    fluency_gamma: float = bounded(3.0, ge=0)  # the guidance of that sampling


def data_concept(data) -> str | None:
    return None if data is None else kind_of(data).concept(data)


def per_sequence_ce(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, mask):
    """Mean over sequences of the mean over each one's positions (`mask`) of
    -sum_k probs * log softmax(logits)[ids] (float32; padding gets no gradient)."""
    logq = logits.float().log_softmax(-1).gather(-1, ids)
    per_token = -(probs * logq).sum(-1) * mask
    return (per_token.sum(1) / mask.sum(1).clamp_min(1)).mean()


@register_method("elm", ElmMethod)
class Elm(Method):
    display_name = "ELM"

    @classmethod
    def check_config(cls, cfg) -> None:
        """A concept to fill the prefixes with, and a forget term to train."""
        unlearn = cfg.unlearn
        if unlearn.get("erase_weight") == 0 and unlearn.get("fluency_weight") == 0:
            raise ConfigError(
                "unlearn.erase_weight and unlearn.fluency_weight are both 0: nothing would be "
                "unlearned; set either above 0"
            )
        if cfg.unlearn.get("concept") is None and data_concept(cfg.data) is None:
            raise ConfigError(
                f"unlearn.concept is null and data={cfg.data.get('name')} names no concept to "
                "erase; set unlearn.concept='...' (docs/baselines.md has wording for WMDP)"
            )

    @property
    def concept(self) -> str:
        found = self.cfg.concept or data_concept(self.ctx.data)
        if found is None:
            raise UserError("unlearn.concept is null and the data names none; set it")
        return found

    def prepare(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        model, tok = ctx.model, ctx.tokenizer
        prompts = elm_reference.item_prompts(cfg, self.concept, ctx.forget_used, ctx.seed)
        self.prompts = prompts  # each forget item's prefixes and bridge
        self.targets = {}
        if cfg.erase_weight > 0:
            self.targets = elm_reference.erase_targets(
                model, tok, ctx.forget, ctx.forget_used, prompts, cfg
            )
        self.greedy = {}
        if self.needs_retain:
            self.greedy = elm_reference.greedy_tokens(
                model, ctx.retain, ctx.retain_used, cfg.batch_size
            )
        self.fluency = {}
        if cfg.fluency_weight > 0:
            self.fluency = elm_reference.fluency_sequences(
                model, tok, ctx.forget, ctx.forget_used, prompts, cfg, ctx.seed, cfg.batch_size
            )

    def erase_loss(self, forget: dict) -> torch.Tensor:
        mask = forget["attention_mask"]
        ids = torch.zeros(*mask.shape, self.cfg.top_k, dtype=torch.long)
        probs = torch.zeros(*mask.shape, self.cfg.top_k)
        for row, item in enumerate(forget["index"]):
            rows, k = self.targets[item][0].shape
            ids[row, :rows, :k], probs[row, :rows, :k] = self.targets[item]
        logits = self.ctx.model(input_ids=forget["input_ids"], attention_mask=mask).logits
        return per_sequence_ce(logits, ids.to(mask.device), probs.to(mask.device), mask)

    def retain_loss(self, retain: dict) -> torch.Tensor:
        mask = retain["attention_mask"]
        greedy = torch.zeros_like(mask)
        for row, item in enumerate(retain["index"]):
            greedy[row, : len(self.greedy[item])] = torch.tensor(self.greedy[item])
        logits = self.ctx.model(input_ids=retain["input_ids"], attention_mask=mask).logits
        ones = torch.ones(*mask.shape, 1, device=mask.device)
        return per_sequence_ce(logits, greedy[..., None], ones, mask)

    def fluency_loss(self, forget: dict) -> torch.Tensor:
        """NLL of each item's bridge and continuation given its text (per sequence, then mean)."""
        device = forget["attention_mask"].device
        seqs = [self.fluency[i] for i in forget["index"]]
        ids, mask = right_padded([s for s, _ in seqs], self.ctx.forget.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        trained = mask[:, 1:].clone()
        for row, (_, start) in enumerate(seqs):
            trained[row, : start - 1] = 0
        logits = self.ctx.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        ones = torch.ones(*trained.shape, 1, device=device)
        return per_sequence_ce(logits, ids[:, 1:, None], ones, trained)

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, terms = self.cfg, {}
        loss = torch.zeros((), device=forget["attention_mask"].device)
        for name, weight, term, batch in (
            ("erase", cfg.erase_weight, self.erase_loss, forget),
            ("fluency", cfg.fluency_weight, self.fluency_loss, forget),
            ("retain", cfg.retain_weight, self.retain_loss, retain),
        ):
            if weight > 0 and batch is not None:
                value = term(batch)
                terms[name] = float(value.detach())
                loss = loss + weight * value
        return loss, terms

    def close(self) -> None:
        self.targets, self.greedy, self.fluency = {}, {}, {}

    @property
    def precomputes_reference(self) -> bool:  # the memory plan's view (unlearn/memory_plan.py)
        """`prepare` runs no-grad forwards to the logits over the forget items."""
        return True
