"""TOFU's figures (Maini et al. 2024), as open-unlearning computes them (src/evals/metrics/
memorization.py, privacy.py, utility.py): answer probability, ROUGE-L recall of greedy answers,
truth ratio in its forget and retain forms, forget quality (a KS test against a retain model's
truth ratios) and model utility (a harmonic mean). Pure functions over models, tokenizers and
lists; `evaluate/metrics/tofu.py` puts them together.

Each item is a prompt (the question, in the tokenizer's chat template or as "Question: q\\nAnswer:")
and a continuation (the answer and the end-of-sequence token); an answer's figures are over the
continuation's tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from kuda_cli.data.kinds.tofu import qa_document, qa_prompt
from kuda_cli.evaluate.scoring import continuation_logprobs, greedy_continuations

EPS = 1e-10  # open-unlearning's guard against a division by zero, kept: figures compare


@dataclass(frozen=True)
class QaFormat:
    """How a question is put to the model: its tokenizer's chat template (with a system prompt
    and, for Llama 3's template, a date) or the plain "Question: q\\nAnswer:" prompt."""

    chat: bool = False
    system_prompt: str | None = None
    date_string: str | None = None


def _without_bos(tokenizer, text: str) -> str:
    """`text` less a leading BOS the tokenizer adds itself when it encodes (no BOS twice)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        return text[len(bos) :]
    return text


def qa_pair(tokenizer, fmt: QaFormat, question: str, answer: str) -> tuple[str, str]:
    """(prompt, continuation) of one item: the continuation is what follows the prompt in the
    whole exchange, ended by the EOS token (as open-unlearning appends it)."""
    if not fmt.chat:
        prompt = qa_prompt(question)
        rest = qa_document(question, answer)[len(prompt) :]
    else:
        chat = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
        chat.append({"role": "user", "content": question})
        extra = {"date_string": fmt.date_string} if fmt.date_string else {}
        prompt = tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True, **extra
        )
        whole = tokenizer.apply_chat_template(
            [*chat, {"role": "assistant", "content": answer}], tokenize=False, **extra
        )
        rest = whole[len(prompt) :] if whole.startswith(prompt) else answer
        prompt = _without_bos(tokenizer, prompt)
    eos = tokenizer.eos_token
    return prompt, rest if not eos or rest.endswith(eos) else rest + eos


def answer_losses(
    model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int
) -> list[float]:
    """Per (prompt, continuation): the mean negative log-likelihood of the continuation's
    tokens (open-unlearning's `avg_loss`)."""
    scored = continuation_logprobs(
        model, tokenizer, list(pairs), batch_size=batch_size, desc="tofu answers"
    )
    return [-total / n for total, n in scored]


def probability(loss: float) -> float:
    """TOFU's answer probability: exp(-mean token NLL), the per-token geometric mean."""
    return math.exp(-loss)


def truth_ratio(correct_loss: float, wrong_losses: Sequence[float]) -> float:
    """P(wrong) / P(correct): P(correct) the probability of the paraphrased (forget, retain) or
    true (real authors, world facts) answer, P(wrong) that of the perturbed answers together,
    exp(-mean of their mean NLLs)."""
    wrong = math.exp(-sum(wrong_losses) / len(wrong_losses))
    return wrong / (math.exp(-correct_loss) + EPS)


def forget_truth_ratio(ratios: Sequence[float]) -> float:
    """Forget form: mean of min(R, 1/R); 1 when the model cannot tell true from false."""
    return _mean([min(r, 1 / (r + EPS)) for r in ratios])


def retain_truth_ratio(ratios: Sequence[float]) -> float:
    """Retain form: mean of max(0, 1 - R); high when the true answer is the likelier."""
    return _mean([max(0.0, 1 - r) for r in ratios])


def normalised_probability(correct_loss: float, wrong_losses: Sequence[float]) -> float:
    """Real authors and world facts: P(answer) / (P(answer) + the sum of P(perturbed))."""
    correct = math.exp(-correct_loss)
    return correct / (correct + sum(math.exp(-w) for w in wrong_losses) + EPS)


@cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(generated: str, answer: str) -> float:
    """ROUGE-L recall of a generated answer against the true one (Porter stemming, as TOFU)."""
    return _scorer().score(answer, generated)["rougeL"].recall


def greedy_answers(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """The model's greedy answer to each prompt, stripped."""
    found = greedy_continuations(
        model,
        tokenizer,
        list(prompts),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc="tofu generate",
    )
    return [text.strip() for text in found]


def forget_quality(forget_ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov test's p-value of the unlearned model's forget truth
    ratios against a retain model's: high when they look drawn from one distribution."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(list(forget_ratios), list(retain_ratios)).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the retain, real-authors and world-facts figures (0 if one is 0)."""
    from scipy.stats import hmean

    return float(hmean(list(values)))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
