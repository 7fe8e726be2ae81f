"""Rewards for online GRPO (Generative RLHF-V): pointwise rewards, pairwise judges, the grouped-comparison score and
group-normalised advantages. Pure functions of answers; the rollout loop that uses them is rlhfv_train.grpo's job.

Grouped comparison: each of a prompt's k answers is judged against every other one in both orders (a pairwise judge
is biased by position), and its score is the mean of its win probabilities:
    S(y_i) = 1 / (2 (k - 1)) * sum_{j != i} [ P(y_i beats y_j | y_i shown first) + P(y_i beats y_j | y_j shown first) ]
A judge here is a callable (record, pairs) -> P(first answer of each pair is better), one float in [0, 1] per pair,
so that a model-based judge can score all k (k - 1) ordered pairs of a group in one batch. Built in: SceneJudge (exact,
for the synthetic scenes) and GenerativeJudge (any Hugging Face model asked "A or B?"). A pointwise reward is a
callable (record, answer) -> float, e.g. scene_reward. GroupScorer puts either behind one interface for the trainer.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..data import PreferenceRecord, PromptFormat, as_hashable, encode, open_media
from ..models import forward_logits

Judge = Callable[[PreferenceRecord, Sequence[tuple[str, str]]], Sequence[float]]


def grouped_comparison(record: PreferenceRecord, answers: Sequence[str], judge: Judge) -> list[float]:
    """S(y_i) for each of `answers` (k >= 2) to the prompt of `record`, from all k (k - 1) ordered pairs."""
    k = len(answers)
    if k < 2:
        raise ValueError(f"grouped comparison needs at least 2 answers per prompt, got {k}")
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    scores = list(judge(record, [(answers[i], answers[j]) for i, j in pairs]))
    if len(scores) != len(pairs):
        raise ValueError(f"the judge returned {len(scores)} scores for {len(pairs)} pairs")
    wins = [0.0] * k
    for (i, j), p in zip(pairs, scores):
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"the judge returned {p}, not a probability in [0, 1]")
        wins[i] += p        # y_i shown first
        wins[j] += 1.0 - p  # y_j shown second: it wins when the first loses
    return [w / (2 * (k - 1)) for w in wins]


def group_advantages(rewards: torch.Tensor, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [groups, k] -> advantages [groups, k]: minus the group mean, divided by the group std when `scale`
    (GRPO; Dr. GRPO sets scale=False). A group whose answers all score alike gets zero advantages."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, k] with k >= 2, got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


class SceneJudge:
    """The exact judge for the synthetic scenes; a tie is 0.5. Needs records with ground-truth `objects`.
    rule "net": more (correct - hallucinated) objects wins, then fewer hallucinated (the pairwise form of
    scene_reward, the measure the trainer reports); rule "strict": fewer hallucinated objects wins, then more correct
    ones, so an answer that names nothing beats any answer with an error."""

    RULES = ("net", "strict")

    def __init__(self, parser: Callable[[str], Sequence] | None = None, rule: str = "net"):
        if rule not in self.RULES:
            raise ValueError(f"scene judge rule must be one of {', '.join(self.RULES)}, got {rule!r}")
        if parser is None:
            from ..data.synthetic import parse_description as parser
        self.parser, self.rule = parser, rule

    def counts(self, record: PreferenceRecord, answer: str) -> tuple[int, int]:
        """(hallucinated, correct) objects of `answer`, each mention counted once."""
        if record.objects is None:
            raise ValueError(f"{record.source}: the scene judge needs the record's ground-truth 'objects'")
        mentioned, present = set(self.parser(answer)), {as_hashable(o) for o in record.objects}
        return len(mentioned - present), len(mentioned & present)

    def _key(self, record: PreferenceRecord, answer: str) -> tuple[int, int]:
        wrong, right = self.counts(record, answer)
        return (right - wrong, -wrong) if self.rule == "net" else (-wrong, right)

    def __call__(self, record: PreferenceRecord, pairs: Sequence[tuple[str, str]]) -> list[float]:
        scores = []
        for first, second in pairs:
            key_a, key_b = self._key(record, first), self._key(record, second)
            scores.append(1.0 if key_a > key_b else 0.0 if key_a < key_b else 0.5)
        return scores


def scene_reward(record: PreferenceRecord, answer: str, parser=None) -> float:
    """A pointwise reward for the synthetic scenes: (correct - hallucinated objects) / objects in the image."""
    wrong, right = SceneJudge(parser).counts(record, answer)
    return (right - wrong) / max(len(set(record.objects)), 1)


JUDGE_TEMPLATE = ("{question} Answer A: {first} Answer B: {second} Which answer describes the image more accurately, "
                  "A or B? The better answer is")


class GenerativeJudge:
    """A Hugging Face model as pairwise judge (Generative RLHF-V): it reads the question, answer A (`first`) and
    answer B (`second`), and P(A is better) = softmax over its next-token logits of the two choice tokens. With an
    image-text-to-text processor the record's images (and video) go in too. grouped_comparison asks for both orders, which
    cancels the judge's preference for a position.

    The choices must each be one token of the judge's tokenizer right after the prompt (checked here)."""

    def __init__(self, model, processor, *, template: str = JUDGE_TEMPLATE, choices: tuple[str, str] = ("A", "B"),
                 batch_size: int = 16, autocast_dtype=None):
        for field in ("{question}", "{first}", "{second}"):
            if field not in template:
                raise ValueError(f"the judge template must contain {field}, got {template!r}")
        if batch_size < 1:
            raise ValueError(f"judge batch_size must be >= 1, got {batch_size}")
        self.model, self.processor, self.template = model, processor, template
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.has_images = hasattr(processor, "image_processor")
        self.prompts = PromptFormat(processor)  # the judge's chat template when it has one
        self.batch_size, self.autocast_dtype = batch_size, autocast_dtype
        probe = self.prompts.prompt(template.format(question="q", first="x", second="y"), 0)
        self.choice_ids = [self._choice_token(probe, choice) for choice in choices]
        if self.choice_ids[0] == self.choice_ids[1]:
            raise ValueError(f"the judge's choices {choices} encode to the same token")

    def _choice_token(self, prompt: str, choice: str) -> int:
        ids = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        base, full = ids(prompt), ids(f"{prompt} {choice}")
        if len(full) != len(base) + 1 or full[:len(base)] != base:
            raise ValueError(f"the judge's tokenizer does not encode {choice!r} as one token after the prompt "
                             f"({len(full) - len(base)} tokens); pick other choices")
        if full[-1] == self.tokenizer.unk_token_id:
            raise ValueError(f"the judge's tokenizer has no token for {choice!r} (it becomes the unknown token); "
                             "use a judge model whose vocabulary has the choices")
        return full[-1]

    @torch.no_grad()
    def __call__(self, record: PreferenceRecord, pairs: Sequence[tuple[str, str]]) -> list[float]:
        (images,), (video,) = open_media([record], self.has_images)
        prompts = [self.prompts.prompt(self.template.format(question=record.question, first=a, second=b),
                                       len(images), video is not None) for a, b in pairs]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        scores = []
        try:
            for start in range(0, len(prompts), self.batch_size):
                texts = prompts[start:start + self.batch_size]
                # Right padding: positions 0.. for every row, as in training; each row's end is read below.
                inputs = encode(self.processor, texts, [images] * len(texts) if images else None,
                                padding_side="right", videos=[video] * len(texts) if video is not None else None)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                logits = forward_logits(self.model, inputs, self.autocast_dtype)
                last = inputs["attention_mask"].sum(-1) - 1
                choice = logits[torch.arange(len(texts), device=device), last][:, self.choice_ids].float()
                scores.extend(torch.softmax(choice, dim=-1)[:, 0].tolist())
        finally:
            self.model.train(was_training)
        return scores


class GroupScorer:
    """The rewards of a group of answers to one prompt, from a pointwise reward (record, answer) -> float or a
    pairwise judge (grouped comparison); and a held-out score of one answer against the record's chosen answer."""

    def __init__(self, *, reward: Callable[[PreferenceRecord, str], float] | None = None, judge: Judge | None = None):
        if (reward is None) == (judge is None):
            raise ValueError("give exactly one of a pointwise reward and a pairwise judge")
        self.reward, self.judge = reward, judge
        # What the held-out score means: the judge's win rate against the reference answer, or the mean reward.
        self.eval_name = "eval_win_rate" if judge is not None else "eval_reward"

    def __call__(self, record: PreferenceRecord, answers: Sequence[str]) -> list[float]:
        if self.judge is not None:
            return grouped_comparison(record, answers, self.judge)
        rewards = [float(self.reward(record, answer)) for answer in answers]
        if not all(r == r and abs(r) != float("inf") for r in rewards):
            raise ValueError(f"{record.source}: the reward function returned {rewards}; rewards must be finite")
        return rewards

    def versus_reference(self, record: PreferenceRecord, answer: str) -> float:
        """The judge's P(answer beats the record's chosen answer), both orders averaged; or the answer's reward."""
        if self.judge is not None:
            return grouped_comparison(record, [answer, record.chosen], self.judge)[0]
        return self(record, [answer])[0]
