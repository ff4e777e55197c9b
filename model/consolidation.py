"""Consolidation: fold a session's knowledge into the user's slow level (a pure function).

Following what we measured (docs: shared LEARNING.md): per-turn updates alone barely recall,
so consolidation replays the session at the slow level and rehearses question→answer pairs
built from what the user stated, while a KL anchor to the frozen model on general text and on
questions the user never answered limits forgetting and false binding. The caller gets probe
figures and decides whether to commit.
"""

from __future__ import annotations

import math
import re
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .backbone import Transformer
from .errors import Interrupted
from .facts import PATTERNS, UNTAUGHT_PROBES, Fact, extract_facts, merge_facts, names_a_thing
from .levels import LevelSpec, LoraState
from .sampling import greedy_continuation
from .subspace import project_out, protected_bases
from .updates import (LevelReport, TrainingExample, _batch, guard, lora_logits, lora_logits_at, token_losses,
                      train_lora, update_on_examples)


@dataclass(frozen=True)
class Slot:
    """A question about something never taught and the start of the answer that would state
    it ("What is my cousin's name?", "Your cousin's name is"): teacher-forcing the prefix puts
    the level at the very position where a taught value would leak."""

    question: str
    prefix: str


@dataclass(frozen=True)
class ConsolidationReport:
    accepted: bool
    reason: str  # "ok" | "forgetting" | "non-finite" | "norm-bound" | "no-data"
    probe_loss: float  # general-text loss with the candidate user level
    baseline_probe_loss: float  # same probe, frozen model
    recall_loss: float  # loss on the rehearsed answers after training
    facts: int
    update_norm: float
    drift: float
    seconds: float
    step_scale: float = 1.0  # < 1: the update was cut back to stay within the probe budget
    steps_kept: int = 0  # training steps in the level kept (< steps_trained: an earlier one)
    # What the drift budget let through: "full", "fewer steps" (an earlier level) or "interpolated".
    trust_region: str = "full"
    # The facts the new level was rehearsed on (this session's and the earlier ones not restated),
    # for the caller to keep with it: the next consolidation rehearses them again.
    known: tuple[Fact, ...] = ()
    steps_trained: int = 0  # `steps`, plus the extra steps taken until the answers were said
    answers_said: float = math.nan  # share of the rehearsed answers the kept level says word for word


def chat_example(tokenizer, messages: list[dict[str, str]], train_roles: tuple[str, ...]) -> TrainingExample:
    """Render messages with the chat template; weight 1 on the content of `train_roles`."""
    ids: list[int] = []
    weights: list[float] = []
    for i in range(len(messages)):
        upto = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)
        new = upto[len(ids):]
        ids = upto
        on = 1.0 if messages[i]["role"] in train_roles else 0.0
        weights.extend([on] * len(new))
    # weights[t] is the weight of predicting ids[t]; shift to targets ids[1:].
    return TrainingExample(ids, weights[1:])


def qa_example(tokenizer, question: str, fact: Fact, value_weight: float = 1.0,
               context: Sequence[dict[str, str]] = ()) -> TrainingExample:
    """`question` answered with the fact's answer, weighted on the answer, its value's tokens
    `value_weight` times as much: a code's later digits are where the backbone's prior wins.
    With `context` (earlier messages, not trained on) the question comes after them."""
    example = chat_example(tokenizer, [*context, {"role": "user", "content": question},
                                       {"role": "assistant", "content": fact.answer}], ("assistant",))
    if context:
        skip = len(tokenizer.encode_chat(list(context), add_generation_prompt=False))
        example = TrainingExample(example.ids, [0.0] * skip + list(example.weights[skip:]))
    if value_weight == 1.0 or not fact.value or fact.value not in fact.answer:
        return example
    first = next(t for t, w in enumerate(example.weights) if w > 0)
    targets = example.ids[first + 1:]  # the assistant's turn: its header, the answer, the end
    offset = tokenizer.decode(targets).find(fact.answer)
    if offset < 0:
        return example
    start = offset + fact.answer.rindex(fact.value)
    end = start + len(fact.value)
    weights = list(example.weights)
    before = 0  # characters decoded so far
    for t in range(len(targets)):
        upto = len(tokenizer.decode(targets[:t + 1]))
        if before < end and upto > start:  # this token carries part of the value
            weights[first + t] = value_weight
        before = upto
    return TrainingExample(example.ids, weights)


# A turn's rehearsal: weight of the KL anchor (general text, parent levels as reference), and
# of the on-policy negatives taken halfway through its steps.
TURN_KL_WEIGHT = 10.0
TURN_NEGATIVE_WEIGHT = 1.0
TURN_SLOTS, TURN_SLOT_WEIGHT = 4, 0.3  # untaught slots per fact turn (slot_loss) and their weight
TURN_BINDING_WEIGHT = 1.0  # taught values against each other (binding_loss)
TURN_EXTRA_ROUND = 2  # steps between checks of whether a turn's rehearsed answers are said
TURN_ANCHOR_TOKENS = 96  # a turn's update must stay cheap: a CPU trains ~50 tokens/s per thread
# Owners for near-miss questions ("my sister's name" taught -> "my cousin's name?" must not get it).
_RELATIONS = ("cousin", "aunt", "best friend", "colleague", "partner", "daughter", "son", "boss", "flatmate")
# Near misses of a named thing or a place ("my café is called Zefo", "I work at Acme"): the answer
# form "Your café is called Zefo." carries the name to any other thing asked by name (stop 17:
# "What is the name of my gym?" -> "Your gym is called Zefo."), so other things are asked by name.
# None is a place the user's own home or work could be ("my village" after "I live in Brisk").
_THINGS = ("school", "bank", "local pub", "hotel", "bakery", "football team", "choir", "book club")


# Ordinary chat questions: after a rehearsal the level must still answer these as its parent does.
GENERAL_QUESTIONS = (
    "What is the capital of France?", "Write one sentence about dogs.", "How many legs does a spider have?",
    "What is 12 plus 30?", "What is the boiling point of water?", "What colour is the sky on a clear day?",
    "Name a fruit that is yellow.", "What does a baker do?", "Explain what rain is in one sentence.",
    "Say hello in French.", "What is the largest ocean?", "Suggest a name for a goldfish.",
    "Why do leaves fall in autumn?", "What is the opposite of cold?", "Tell me a fun fact about the moon.",
    "Name three primary colours.", "What is a synonym for happy?", "Who wrote Romeo and Juliet?")


def untaught_slots(facts: list[Fact], taught: set[str], n: int,
                   neighbours: Callable[[str], list[str]] | None = None, owners: int | None = None) -> list[Slot]:
    """Slots that look like the taught ones but were never filled, each once: the same slot with
    another owner ("my brother's name" when the sister's was taught; "my school's name" when a
    thing or place was), then common personal attributes and the extraction patterns' unfilled
    frames. A person's other owners are `neighbours(owner)` (the words nearest it,
    `embedding_neighbours`) or, without it, a fixed list of relations; a thing's, a fixed list of
    things. Owners are taken in turn over the facts; `owners`: other owners per fact (default:
    NEAR_OWNERS neighbours, or one)."""
    owners = owners if owners is not None else NEAR_OWNERS if neighbours else 1
    rounds: list[list[Slot]] = []
    used: set[str] = set()  # fixed-list owners already given to a fact: the next fact gets others
    for i, f in enumerate(facts):
        thing = names_a_thing(f)
        if not (thing or f.key.endswith("'s name")):
            continue
        owner = f.key.removesuffix("'s name")
        head, _, last = owner.rpartition(" ")  # "piano teacher" -> another kind of teacher
        if neighbours and not thing:
            near = [o for o in (f"{head} {w}".strip() for w in neighbours(last)) if f"{o}'s name" not in taught]
        else:
            pool = _THINGS if thing else _RELATIONS
            fixed = [r for r in pool if f"{r}'s name" not in taught]
            start = len(f.answer) + i  # where in the list: varies with the facts
            near = [o for o in fixed[start % len(fixed):] + fixed[:start % len(fixed)] if o not in used][:owners]
            used.update(near)
        for r, o in enumerate(near[:owners]):
            if len(rounds) <= r:
                rounds.append([])
            rounds[r].append(Slot(f"What is the name of my {o}?", f"Your {o} is called") if thing
                             else Slot(f"What is my {o}'s name?", f"Your {o}'s name is"))
    out = [s for r in rounds for s in r]
    attributes = [Slot(f"What is my {u}?", f"Your {u} is") for u in UNTAUGHT_PROBES if u not in taught]
    frames = [Slot(qs[0], a.split("{0}")[0].strip()) for _, key, qs, a in PATTERNS if "{0}" not in key and key not in taught]
    out += [s for pair in zip(attributes, frames) for s in pair] + attributes[len(frames):] + frames[len(attributes):]
    return list({s.question: s for s in out}.values())[:n]  # owners recur across the taught names


# Other owners per taught name, nearest first: a value leaks into the nearest relations first
# (sister's -> nephew's, dog's -> horse's). Stop 13, training until said: 4 owners a name and 20
# slots took false binding from 24% to 18% for 4 points of recall (88% -> 84%), but with them a
# 20-session user drifted +2.63% on general English after 10 sessions (stop 14; these: +1.35%).
NEAR_OWNERS = 2


# Words for a kind of owner rather than another owner: asked "what is my pet's name?" after
# the dog's, the dog's name is the right answer, so these never serve as near misses.
_KINDS = ("pet", "animal", "sibling", "relative", "parent", "child", "family", "friend", "person", "people")


def embedding_neighbours(model: Transformer, tokenizer, k: int = 8) -> Callable[[str], list[str]]:
    """`word -> the k whole words nearest it by the backbone's input embedding` (cosine), its
    own forms, plurals and kinds left out: "sister" -> brother, cousin, daughter, nephew, aunt,
    ...; "dog" -> cat, puppy, canine, horse, bird, .... These are where a taught value leaks
    first, found without a list of the relations a user might name. Computed once per model;
    a word that is not one token has none."""
    def vocabulary():
        ids = [t for t in range(model.embed_tokens.num_embeddings)
               if re.fullmatch(r" [a-z]{3,}", tokenizer.decode([t]))]
        table = model.embed_tokens.weight.detach()[ids].float()
        return ids, [tokenizer.decode([t]).strip() for t in ids], F.normalize(table, dim=-1)

    ids, words, table = _frozen(model, ("vocabulary",), vocabulary)
    index, known = {t: i for i, t in enumerate(ids)}, set(words)

    def other(word: str, w: str) -> bool:
        plural = w.endswith("s") and w[:-1] in known
        return not (plural or w in _KINDS or w.startswith(word) or word.startswith(w))

    def near(word: str) -> list[str]:
        token = tokenizer.encode(f" {word}")
        if len(token) != 1 or token[0] not in index:
            return []
        order = (table @ table[index[token[0]]]).argsort(descending=True)[:4 * k].tolist()
        return [words[j] for j in order if other(word, words[j])][:k]
    return near


def near_miss_questions(facts: list[Fact], taught: set[str], n: int,
                        neighbours: Callable[[str], list[str]] | None = None, owners: int | None = None) -> list[str]:
    return [s.question for s in untaught_slots(facts, taught, n, neighbours, owners)]


def _value_start(tokenizer, prefix: str, value: str) -> tuple[list[int], int | None]:
    """The tokens of `prefix` plus any bare-space token before `value` (numbers start with one),
    and the value's first real token."""
    pre = tokenizer.encode(prefix)
    rest = tokenizer.encode(f"{prefix} {value}")[len(pre):]
    while len(rest) > 1 and not tokenizer.decode(rest[:1]).strip():
        pre, rest = pre + rest[:1], rest[1:]
    return pre, (rest[0] if rest and tokenizer.decode(rest[:1]).strip() else None)


@dataclass(frozen=True)
class ValueBatch:
    """Questions with their answer prefix teacher-forced, cut at the position that predicts the
    value: ids (N, T), select (N, T) marking that position, the first tokens of the taught
    values (C,), and per row the index of its own value among them (-1: an untaught slot)."""

    ids: torch.Tensor
    select: torch.Tensor
    candidates: torch.Tensor
    target: torch.Tensor


def value_batch(tokenizer, slots: list[Slot], values: list[str], targets: list[str | None]) -> ValueBatch | None:
    firsts = {v: _value_start(tokenizer, "It is", v)[1] for v in values}
    candidates = sorted({t for t in firsts.values() if t is not None})
    examples, target = [], []
    for slot, value in zip(slots, targets):
        pre = _value_start(tokenizer, slot.prefix, value)[0] if value else tokenizer.encode(slot.prefix)
        prompt = tokenizer.encode_chat([{"role": "user", "content": slot.question}])
        examples.append(TrainingExample(prompt + pre + [0], [0.0] * (len(prompt) + len(pre) - 1) + [1.0]))
        target.append(candidates.index(firsts[value]) if value and firsts[value] in candidates else -1)
    if not examples:
        return None
    ids, select, _, _ = _selected(examples)
    return ValueBatch(ids, select, torch.tensor(candidates, dtype=torch.long), torch.tensor(target, dtype=torch.long))


def fact_slots(facts: list[Fact], form: int) -> list[Slot]:
    """Each fact's question (form `form`) with its answer up to the value."""
    return [Slot(f.questions[form % len(f.questions)], f.answer[:f.answer.rindex(f.value)].rstrip()) for f in facts]


@dataclass(frozen=True)
class ValueTerms:
    """The binding and untaught-slot terms of one rehearsal: batches built once, the slots'
    reference distributions from the parent levels (one batch of slots per step, in turn),
    one binding batch per question form."""

    slots: list[ValueBatch]
    slot_refs: list[torch.Tensor]
    bindings: list[ValueBatch]
    slot_weight: float
    binding_weight: float

    def loss(self, logits_fn, step: int) -> torch.Tensor | float:
        loss = 0.0
        if self.slots:
            batch, ref = self.slots[step % len(self.slots)], self.slot_refs[step % len(self.slots)]
            loss = loss + self.slot_weight * slot_loss(logits_fn(batch.ids, batch.select), ref, batch)
        if self.bindings:
            batch = self.bindings[step % len(self.bindings)]
            loss = loss + self.binding_weight * binding_loss(logits_fn(batch.ids, batch.select), batch)
        return loss


def value_terms(tokenizer, facts: list[Fact], near: list[Fact], taught: set[str], forms: int, n_slots: int,
                slot_weight: float, binding_weight: float, parent_logits,
                neighbours: Callable[[str], list[str]] | None = None, pool: int = 0,
                owners: int | None = None) -> ValueTerms:
    """Binding over `facts` (each question form in turn) and `n_slots` untaught slots near `near`
    per step; with `pool` > `n_slots`, that many slots (`owners` other owners per name) taken
    `n_slots` at a time in turn: wider cover at the same cost per step. `parent_logits(ids)`
    gives the reference the slots are held to."""
    values = [f.value for f in facts]
    untaught = untaught_slots(near, taught, max(n_slots, pool), neighbours, owners) if slot_weight and n_slots else []
    chunks = [untaught[i:i + n_slots] for i in range(0, len(untaught), n_slots)]
    slots = [value_batch(tokenizer, chunk, values, [None] * len(chunk)) for chunk in chunks]
    bindings = [value_batch(tokenizer, fact_slots(facts, r), values, values) for r in range(forms)
                ] if binding_weight and len(facts) > 1 else []
    with torch.inference_mode():
        refs = [F.log_softmax(parent_logits(b.ids)[b.select].float(), -1) for b in slots]
    return ValueTerms(slots, refs, bindings, slot_weight, binding_weight)


def binding_loss(logits: torch.Tensor, batch: ValueBatch) -> torch.Tensor:
    """At each taught question's value position, its own value against the session's other
    taught values (cross-entropy over their first tokens): rehearsal alone teaches "a taught
    name goes here" before it teaches which one (LEARNING.md: a value prior shared across keys)."""
    rows = batch.target >= 0
    if len(batch.candidates) < 2 or not bool(rows.any()):
        return logits.new_zeros(())
    return F.cross_entropy(logits[rows][:, batch.candidates].float(), batch.target[rows])


def slot_loss(logits: torch.Tensor, ref_logprobs: torch.Tensor, batch: ValueBatch) -> torch.Tensor:
    """At untaught slots' value positions: KL to the parent's distribution, plus unlikelihood
    of the mass on taught values' first tokens (-log(1 - p)), which is ~0 until a value leaks."""
    loss = _kl(logits, ref_logprobs, None)
    if len(batch.candidates):
        mass = F.softmax(logits.float(), -1)[:, batch.candidates].sum(-1)
        loss = loss + (-torch.log1p(-mass.clamp(max=1 - 1e-6))).mean()
    return loss


def learn_turn(model: Transformer, tokenizer, spec: LevelSpec, state: LoraState, frozen: list[LoraState],
               messages: list[dict[str, str]], anchor_ids: list[int]) -> tuple[LoraState, LevelReport]:
    """The medium level after one turn; `messages` is the session so far, ending with the
    user's message and the reply. Two jobs, two rates: a message that states facts is rehearsed
    as question→answer pairs (statement training alone does not carry over to questions),
    together with the session's earlier facts so they are not overwritten, for
    `spec.rehearsal_steps` at `spec.rehearsal_lr` under a KL anchor to the parent levels on
    general text; any other message is a gentle next-token update (`spec.steps` at `spec.lr`),
    and on the `spec.replay_turns` turns after the last one that stated facts the session's
    facts are rehearsed again for `spec.replay_steps`."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    users = [m["content"] for m in messages if m["role"] == "user"]
    turn = system + messages[-2:]
    # What a later question sees in the attention window: the session's last exchanges.
    recent = system + messages[len(system):][-2 * max(spec.rehearsal_context_turns, 1):]
    new_facts = extract_facts(users[-1]) if users else []
    before = users[-20:-1]  # the session's earlier messages whose facts are rehearsed with a turn's
    if new_facts and spec.rehearsal_steps:
        keys = {f.key for f in new_facts}
        earlier = [f for f in extract_facts("\n".join(before)) if f.key not in keys]
        return _rehearse(model, tokenizer, spec, state, frozen, new_facts, earlier, turn, recent, len(users), anchor_ids,
                         spec.rehearsal_steps, spec.rehearsal_extra_steps)
    state, report = update_on_examples(model, spec, state, frozen, [chat_example(tokenizer, turn, ("user",))])
    stated = [i for i, text in enumerate(before) if extract_facts(text)]
    since = len(before) - stated[-1] if stated else 0  # turns since the last fact, this one included
    if not (spec.replay_steps and spec.rehearsal_steps and 0 < since <= spec.replay_turns
            and report.accepted):
        return state, report
    # Spaced rehearsal: the facts were rehearsed while they were new; a few turns on, once
    # more (the last fact of a session otherwise gets one turn's steps).
    session = extract_facts("\n".join(before))
    return _rehearse(model, tokenizer, spec, state, frozen, [], session, turn, recent, len(users), anchor_ids,
                     spec.replay_steps, 0)


def _rehearse(model: Transformer, tokenizer, spec: LevelSpec, state: LoraState, frozen: list[LoraState],
              new_facts: list[Fact], earlier: list[Fact], turn: list[dict[str, str]],
              recent: list[dict[str, str]], turns: int,
              anchor_ids: list[int], steps: int, extra_steps: int) -> tuple[LoraState, LevelReport]:
    """`steps` of question→answer rehearsal at `spec.rehearsal_lr`: every form of `new_facts`
    and one form of each of `earlier` (asked after `recent`, the session's last exchanges) per step, under the KL anchors (general text, the chat
    anchor after `turn`), the binding and untaught-slot terms, and on-policy negatives from
    halfway; then up to `extra_steps` more until the rehearsed answers are said."""
    started = time.perf_counter()
    focus = new_facts or earlier  # whose near misses are held

    def qa(f: Fact, form: int, context=()) -> TrainingExample:
        return qa_example(tokenizer, f.questions[form % len(f.questions)], f, context=context)

    forms = max(len(f.questions) for f in focus)
    new_qa = [qa(f, r) for f in new_facts for r in range(forms)]
    # Earlier facts are asked after this turn: later in a session they are asked after other
    # turns, which otherwise lead the answer astray (stop 19: asked alone 87%, in the window 57%).
    earlier_qa = [[qa(f, r, recent) for f in earlier] for r in range(forms)]  # each round, one form of each
    rounds = [_selected(new_qa + earlier_qa[r]) for r in range(forms)]
    windows = anchor_windows(anchor_ids, TURN_ANCHOR_TOKENS)
    anchor = windows[turns % len(windows)]  # each turn anchors on another stretch of text
    anchor_sel = torch.ones_like(anchor, dtype=torch.bool)
    chat_ids, chat_sel, _, chat_w = _selected(chat_anchor(model, tokenizer, context=turn))
    taught = {f.key for f in new_facts + earlier}
    terms = value_terms(tokenizer, new_facts + earlier, focus, taught, forms, TURN_SLOTS, TURN_SLOT_WEIGHT,
                        TURN_BINDING_WEIGHT, lambda ids: _parent_logits(model, spec, frozen, state, ids))
    with torch.inference_mode():
        ref = F.log_softmax(_parent_logits(model, spec, frozen, state, anchor)[anchor_sel].float(), -1)
        chat_ref = F.log_softmax(_parent_logits(model, spec, frozen, state, chat_ids)[chat_sel].float(), -1)
    step, negatives = [0], [None]

    def objective(logits_fn):
        ids, select, targets, weights = rounds[step[0] % len(rounds)]
        step[0] += 1
        losses = F.cross_entropy(logits_fn(ids, select).float(), targets, reduction="none")
        answer = (losses * weights).sum() / weights.sum()
        loss = answer + TURN_KL_WEIGHT * (_kl(logits_fn(anchor, anchor_sel), ref, None)
                                          + _kl(logits_fn(chat_ids, chat_sel), chat_ref, chat_w))
        loss = loss + terms.loss(logits_fn, step[0] - 1)
        if negatives[0] is not None:
            n_ids, n_select, n_weights, n_ref = negatives[0]
            loss = loss + TURN_NEGATIVE_WEIGHT * _kl(logits_fn(n_ids, n_select), n_ref, n_weights)
        return loss, float(answer.detach())

    half = steps // 2
    new, surprise = train_lora(model, spec, state, frozen, objective, half, spec.rehearsal_lr)
    general = [GENERAL_QUESTIONS[turns % len(GENERAL_QUESTIONS)]]
    negatives[0] = _on_policy_negatives(model, tokenizer, spec, frozen + [new], frozen,
                                        near_miss_questions(focus, taught, 1) + general, 10)
    new, _ = train_lora(model, spec, new, frozen, objective, steps - half, spec.rehearsal_lr)
    done, limit = steps, steps + extra_steps
    rehearsed = new_qa + [e for form in earlier_qa for e in form] if limit > done else []
    while done < limit and answers_said(model, spec, new, rehearsed, frozen) < 1.0:
        more = min(TURN_EXTRA_ROUND, limit - done)
        new, _ = train_lora(model, spec, new, frozen, objective, more, spec.rehearsal_lr)
        done += more
    return guard(spec, state, new, None, surprise, started)


def _parent_logits(model: Transformer, spec: LevelSpec, frozen: list[LoraState], like: LoraState,
                   ids: torch.Tensor) -> torch.Tensor:
    """Logits with only the parent (frozen) levels applied."""
    if not frozen:
        return model(ids)
    zero_a = like.a.new_zeros(len(spec.layers), 0, like.a.shape[-1])
    zero_b = like.b.new_zeros(len(spec.layers), like.b.shape[1], 0)
    return lora_logits(model, spec, frozen, zero_a, zero_b, ids)


def _greedy(model: Transformer, ids: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    return greedy_continuation(lambda x: model(x)[0, -1], ids, n, eos)


# What the frozen model says does not change between consolidations: computed once per model.
_FROZEN_CACHE: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


def _frozen(model: Transformer, key: tuple, compute):
    cache = _FROZEN_CACHE.setdefault(model, {})
    if key not in cache:
        if len(cache) > 256:
            cache.clear()
        cache[key] = compute()
    return cache[key]


def chat_anchor(model: Transformer, tokenizer, count: int = 2, tokens: int = 40,
                context: list[dict[str, str]] = ()) -> list[TrainingExample]:
    """The frozen model's own greedy replies to ordinary questions (computed once per model),
    weighted on the reply: KL along them keeps a level from changing how the assistant answers
    everything else (a rehearsed fact otherwise leaks into unrelated replies). With `context`
    (earlier messages of the conversation) the question comes after it: a level must not make
    the assistant copy its last reply instead of answering the new question."""
    def compute():
        out = []
        for q in GENERAL_QUESTIONS[-count:]:
            prompt = tokenizer.encode_chat([{"role": "user", "content": q}])
            out.append((q, _greedy(model, prompt, tokens, tokenizer.eos_token_ids)))
        return out
    examples = []
    for q, reply in _frozen(model, ("chat-anchor", count, tokens), compute):
        prompt = tokenizer.encode_chat([*context, {"role": "user", "content": q}])
        examples.append(TrainingExample(prompt + reply, [0.0] * (len(prompt) - 1) + [1.0] * len(reply)))
    return examples


def _answer_logprobs(model: Transformer, example: TrainingExample) -> torch.Tensor:
    """Frozen log-probabilities (K, V) at the weighted positions of one example."""
    ids, select, _, _ = _selected([example])
    with torch.inference_mode():
        return F.log_softmax(model(ids)[select].float(), -1)


def _greedy_level(model: Transformer, spec: LevelSpec, levels: list[LoraState], ids: list[int], n: int,
                  eos: tuple[int, ...]) -> list[int]:
    """Greedy continuation with LoRA levels applied."""
    zero_a = levels[0].a.new_zeros(len(spec.layers), 0, levels[0].a.shape[-1])
    zero_b = levels[0].b.new_zeros(len(spec.layers), levels[0].b.shape[1], 0)

    def next_logits(x: torch.Tensor) -> torch.Tensor:
        select = torch.zeros_like(x, dtype=torch.bool)
        select[0, -1] = True
        return lora_logits_at(model, spec, levels, zero_a, zero_b, x, select)[0]
    return greedy_continuation(next_logits, ids, n, eos)


def _on_policy_negatives(model: Transformer, tokenizer, spec: LevelSpec, levels: list[LoraState],
                         parent: list[LoraState], questions: list[str], tokens: int):
    """Answer `questions` (about things never taught) with `levels`, and return what pulls the
    level towards its parent along those answers: (ids, select, weights, parent log-probs),
    or None. Where a taught value leaks into an untaught slot, the parent's distribution at
    that position pushes it down (LEARNING.md: the first thing that moved false binding)."""
    examples = []
    for q in questions:
        prompt = tokenizer.encode_chat([{"role": "user", "content": q}])
        answer = _greedy_level(model, spec, levels, prompt, tokens, tokenizer.eos_token_ids)
        if answer:
            examples.append(TrainingExample(prompt + answer, [0.0] * (len(prompt) - 1) + [1.0] * len(answer)))
    if not examples:
        return None
    ids, select, _, weights = _selected(examples)
    with torch.inference_mode():
        ref = F.log_softmax(_parent_logits(model, spec, parent, levels[-1], ids)[select].float(), -1)
    return ids, select, weights, ref


def probe_loss(model: Transformer, spec: LevelSpec, levels: list[LoraState], probe_ids: list[int]) -> float:
    """Mean next-token loss on general text, with the given LoRA levels (none = frozen)."""
    ids = torch.tensor([probe_ids])
    with torch.inference_mode():
        if levels:
            zero_a = torch.zeros(len(spec.layers), 0, levels[0].a.shape[-1])
            zero_b = torch.zeros(len(spec.layers), levels[0].b.shape[1], 0)
            logits = lora_logits(model, spec, levels, zero_a, zero_b, ids)
        else:
            logits = model(ids)
        return float(token_losses(logits, ids[:, 1:]).mean())


@dataclass(frozen=True)
class ConsolidationConfig:
    steps: int = 12
    # Then up to this many more, `learn_every` at a time, while the level does not yet say every
    # rehearsed answer word for word (`answers_said`): codes and long names take longer than
    # 12 steps. Past the drift budget, the level of `steps` steps is tried before any other
    # cut-back. Stop 13, 10 users' first consolidations: recall 60% -> 88%, false binding 14% ->
    # 24%. Every session of a 20-session user training on took general perplexity to +2.88%
    # (12 steps: +1.81%), past the 2% goal, so by default only a user's first consolidation (an
    # empty level, the whole drift budget ahead of it) trains on; later ones stop at `steps`.
    extra_steps: int = 12
    learn_every: int = 6
    extra_steps_from_empty_only: bool = True
    # Past the drift budget, the levels along the extra steps (every `learn_every`), latest first,
    # before the level of `steps`. Stop 16: user03 kept step 18 instead of 12, recall 40% -> 60%.
    extension_fallbacks: bool = True
    lr: float = 5e-3
    kl_weight: float = 10.0
    untaught_weight: float = 1.0
    # Replaying the user's statements as plain next-token loss added drift on general text
    # (+2.11% -> +1.44% without it) at the same recall: the question->answer rehearsal carries it.
    replay_weight: float = 0.0
    max_forgetting: float = 0.05  # accept if probe loss <= baseline * (1 + this)
    # and probe perplexity <= frozen's * (1 + this): a drift budget for the user's whole history
    # 2% with the 1.1k-token probe (stop 8): after 10 sessions of one user general perplexity was
    # +1.35% (2 updates cut back) against +2.54% with the old 383-token probe at 8%, at 73% of the
    # user's facts recalled against 85%.
    probe_ppl_budget: float = 0.02
    # Past the budget, first the level as it was every this many steps (0: never), latest first,
    # then interpolation. From an empty level interpolation keeps an answer's form and loses its
    # values (stop 10: user03 recalled 0% at x0.5, 60% with the level of step 18); in a long chain
    # it is better (10 sessions, every 3: latest values recalled 45% against 73%), so 0.
    fallback_every: int = 0
    shrink: tuple[float, ...] = (0.5, 0.25)  # still past it: try old + alpha (new - old) for these alphas
    untaught_probes: int = 4
    anchor_window: int = 256  # tokens of anchor text per step (0: all of it every step)
    # Untaught slots with their answer prefix teacher-forced (`slot_loss`): room for every taught
    # name's NEAR_OWNERS other owners.
    slots: int = 8
    slot_weight: float = 1.0
    # > `slots`: this many untaught slots (`slot_owners` other owners per name, 0: the default),
    # `slots` of them a step in turn: more near misses covered at the same cost per step. Stop 16,
    # 10 users' first consolidations, 32 slots, 6 embedding owners: false binding 24% -> 10%,
    # recall 90% -> 83%; in every consolidation of a 20-session user, +2.09% general perplexity
    # after 10 sessions against +1.35% (benchmarks/README.md, "Stop 16"), so off.
    slot_pool: int = 0
    slot_owners: int = 0
    binding_weight: float = 1.0  # taught values against each other at their value positions (`binding_loss`)
    # > 0: the update of A stays out of the MLP hidden directions that hold this share of the
    # anchor text's energy (`subspace.py`), so ordinary text passes the new level unchanged.
    protect_energy: float = 0.0
    # On-policy negatives: at these steps, answer untaught questions with the level being trained
    # and pull it towards the frozen model along its own answers (value positions included).
    on_policy_at: tuple[int, ...] = (6,)
    on_policy_probes: int = 10
    on_policy_tokens: int = 12
    on_policy_weight: float = 1.0
    # Near misses the on-policy questions ask about: "embedding", up to `on_policy_owners_per_fact`
    # of the backbone's nearest words per taught owner ("uncle" after "brother", "horse" after
    # "dog": where a value leaks first), or "" the slots' owners (`near_owners`). Stop 20, 10
    # users' first consolidations: 10 such questions against 4 from the relations list took false
    # binding 20% -> 14%, recall 89% -> 90%, general ppl +0.85% -> +0.71% (benchmarks/README.md).
    on_policy_owners: str = "embedding"
    on_policy_owners_per_fact: int = 3
    # Ask them again after every extension round and pull along the new answers instead. Off: the
    # nearest words include the owner's synonyms ("puppy" for a dog), and asked once the level
    # says the taught answer they pull it back (stop 20: recall 71%, false binding 12%).
    on_policy_refresh: bool = False
    # Only in a user's first consolidation. In later ones the level already knows the user, asked
    # at on_policy_at it answers an owner's synonyms with the taught value, and the pull erases it:
    # stop 22, one user's 5 sessions, latest values recalled 50% with the pull in every
    # consolidation against 75% without it (benchmarks/README.md, "Stop 22").
    on_policy_from_empty_only: bool = True
    # Other owners in the near-miss slots and questions: "embedding" (the backbone's nearest words
    # to a taught owner: sister -> brother, cousin, nephew) or "relations" (a fixed list). Stop 10,
    # 24 steps, 9 users: embedding gave recall 88% and false binding 18% against 93% and 22%.
    # Stop 13, training on until the answers are said, 4 owners a name and 20 slots: 84% and
    # 18%; stop 14: with them every consolidation of a long user drifts more (+2.63% after 10
    # sessions against +1.35%). benchmarks/README.md, "Stop 13" and "Stop 14".
    near_owners: str = "relations"
    rotate_questions: bool = True  # one question form per fact per step (cheaper than all forms)
    replay: str = "facts"  # "facts": replay only the user messages that stated facts; "all"
    # Facts of earlier sessions rehearsed with this session's (their latest values, the most recent
    # this many): without them a user's level kept 0 of 6 values taught in sessions 1-10 after 20.
    rehearse_known: int = 32
    # Weight of a rehearsed answer's value tokens (the rest weigh 1). 4 was worse on 4 users:
    # recall 60% vs 68%, general ppl +1.6% vs +1.0%, and no 4-digit code recalled either way.
    value_weight: float = 1.0


def consolidate(model: Transformer, tokenizer, spec: LevelSpec, user_state: LoraState,
                transcript: list[dict[str, str]], anchor_ids: list[int], probe_ids: list[int],
                config: ConsolidationConfig = ConsolidationConfig(),
                should_stop: Callable[[], bool] | None = None, known: tuple[Fact, ...] = ()
                ) -> tuple[LoraState, ConsolidationReport]:
    """Fold what the user said in `transcript` into `user_state`, rehearsing the `known` facts of
    earlier sessions with it (`report.known`: what to keep for the next); never mutates its inputs.

    `should_stop()` is asked before every model call (each forward pass of training, the frozen
    model's answers, the probe); when it says yes the consolidation raises `Interrupted`, so a
    server shutting down need not wait minutes for it."""
    started = time.perf_counter()

    def checkpoint() -> None:  # before every model call: a step takes seconds to minutes on a CPU
        if should_stop is not None and should_stop():
            raise Interrupted("consolidation interrupted before it finished; nothing was changed")

    checkpoint()
    user_text = "\n".join(m["content"] for m in transcript if m["role"] == "user")
    stated = extract_facts(user_text)
    facts = list(merge_facts(known, stated, config.rehearse_known))
    statements = [m for m in transcript if m["role"] == "user"]
    baseline = _frozen(model, ("probe", tuple(probe_ids)), lambda: probe_loss(model, spec, [], probe_ids))
    if not stated and not statements:
        return user_state, ConsolidationReport(False, "no-data", baseline, baseline, math.nan, 0, 0.0,
                                               user_state.weight_norm(), time.perf_counter() - started,
                                               known=known)

    rehearsal = [qa_example(tokenizer, q, f) for f in facts for q in f.questions]
    if config.replay == "facts" and stated:  # only the messages that stated something
        statements = [m for m in statements if extract_facts(m["content"])] or statements
    replay = [chat_example(tokenizer, [m], ("user",)) for m in statements]
    # Rehearsal rounds: each step sees one question form per fact, cycling through the forms.
    forms = max((len(f.questions) for f in facts), default=1) if config.rotate_questions else 1
    rounds = [[qa_example(tokenizer, f.questions[r % len(f.questions)], f, config.value_weight)
               for f in facts] for r in range(forms)] if config.rotate_questions else [rehearsal]
    taught = {f.key for f in facts}
    untaught = [u for u in UNTAUGHT_PROBES if u not in taught][:config.untaught_probes]
    negatives = []
    for attr in untaught:
        checkpoint()
        prompt = tokenizer.encode_chat([{"role": "user", "content": f"What is my {attr}?"}])
        answer = _frozen(model, ("greedy", tuple(prompt)), lambda: _greedy(model, prompt, 12, tokenizer.eos_token_ids))
        negatives.append(TrainingExample(prompt + answer, [0.0] * (len(prompt) - 1) + [1.0] * len(answer)))

    rounds = [_selected(r) for r in rounds if r]
    groups = [(_selected(replay), config.replay_weight)] if replay and config.replay_weight else []
    step = [0]
    # Start where the level's last consolidation stopped, so a user's sessions anchor on the
    # whole text in turn rather than on its first windows every time.
    anchors = anchor_windows(anchor_ids, config.anchor_window, start=int(user_state.step))
    neg = _selected(negatives) if negatives else None
    checkpoint()
    chat_ids, chat_sel, _, chat_w = _selected(chat_anchor(model, tokenizer))
    checkpoint()
    neighbours = embedding_neighbours(model, tokenizer) if config.near_owners == "embedding" else None
    terms = value_terms(tokenizer, facts, facts, taught, forms, config.slots, config.slot_weight,
                        config.binding_weight, model, neighbours, config.slot_pool, config.slot_owners or None)
    checkpoint()
    with torch.inference_mode():
        chat_ref = _frozen(model, ("chat-anchor-logprobs",), lambda: F.log_softmax(model(chat_ids)[chat_sel].float(), -1))
        neg_ref = torch.cat([_frozen(model, ("answer-logprobs", tuple(e.ids)), lambda e=e: _answer_logprobs(model, e))
                             for e in negatives]) if neg is not None else None

    def objective(logits_fn):
        loss, surprise = 0.0, 0.0
        batches = groups + ([(rounds[step[0] % len(rounds)], 1.0)] if rounds else [])
        anchor = anchors[step[0] % len(anchors)]
        step[0] += 1
        for (ids, select, targets, weights), w in batches:
            losses = F.cross_entropy(logits_fn(ids, select).float(), targets, reduction="none")
            mean = (losses * weights).sum() / weights.sum().clamp_min(1e-6)
            loss = loss + w * mean
            surprise += float(mean.detach()) * w
        with torch.inference_mode():  # the frozen model's distribution on this step's window
            anchor_ref = F.log_softmax(model(anchor)[0].float(), -1)
        kl = _kl(logits_fn(anchor)[0], anchor_ref, None) + _kl(logits_fn(chat_ids, chat_sel), chat_ref, chat_w)
        loss = loss + config.kl_weight * kl
        loss = loss + terms.loss(logits_fn, step[0] - 1)
        if neg is not None:
            loss = loss + config.untaught_weight * _kl(logits_fn(neg[0], neg[1]), neg_ref, neg[3])
        return loss, surprise

    pulls = user_state.is_empty or not config.on_policy_from_empty_only
    untaught_questions = []  # the on-policy near misses; none asked when the level does not pull
    if pulls:
        probe_neighbours = embedding_neighbours(model, tokenizer) if config.on_policy_owners == "embedding" else neighbours
        untaught_questions = near_miss_questions(facts, taught, config.on_policy_probes, probe_neighbours,
                                                 config.on_policy_owners_per_fact or None)
    on_policy: list = []  # [(ids, select, weights, frozen logprobs)]

    def full_objective(logits_fn):
        if should_stop is not None:
            inner = logits_fn

            def logits_fn(ids, select=None):
                checkpoint()
                return inner(ids, select)
        loss, surprise = objective(logits_fn)
        for ids, select, weights, ref in on_policy:
            loss = loss + config.on_policy_weight * _kl(logits_fn(ids, select), ref, weights) / len(on_policy)
        return loss, surprise

    project = None
    if config.protect_energy > 0:
        bases = _frozen(model, ("protected", spec.layers, config.protect_energy, config.anchor_window, len(anchor_ids)),
                        lambda: protected_bases(model, spec.layers, anchors, config.protect_energy))
        # A fresh level (B = 0) is projected whole at no cost; a trained one keeps what it has.
        origin = torch.zeros_like(user_state.a) if user_state.is_empty else user_state.a

        def project(a: torch.Tensor) -> torch.Tensor:
            return project_out(a, origin, bases)
    new, surprise, done = user_state, math.nan, 0
    if project is not None:
        new = replace(new, a=project(new.a))
    on_policy_stops = {s for s in config.on_policy_at if 0 < s < config.steps} if pulls else set()
    every = config.fallback_every
    fallback_stops = set(range(every, config.steps, every)) if every > 0 else set()
    fallbacks: list[tuple[int, LoraState]] = []  # (steps trained, level) along the way, oldest first
    for stop in sorted(on_policy_stops | fallback_stops) + [config.steps]:
        new, first = train_lora(model, spec, new, [], full_objective, stop - done, config.lr, project)
        surprise = first if done == 0 else surprise
        done = stop
        if done in fallback_stops:
            fallbacks.append((done, new))
        if done in on_policy_stops and untaught_questions:
            checkpoint()
            negatives_now = _on_policy_negatives(model, tokenizer, spec, [new], [], untaught_questions,
                                                 config.on_policy_tokens)
            if negatives_now is not None:
                on_policy = [negatives_now]
    extends = not config.extra_steps_from_empty_only or user_state.is_empty
    limit = config.steps + (max(config.extra_steps, 0) if extends else 0)
    trained = [(done, new)]  # (steps, level): the planned steps' level, then one per extra round
    while done < limit and rehearsal:
        checkpoint()
        if answers_said(model, spec, new, rehearsal) == 1.0:
            break
        stop = min(done + max(config.learn_every, 1), limit)
        new, _ = train_lora(model, spec, new, [], full_objective, stop - done, config.lr, project)
        done = stop
        trained.append((done, new))
        if config.on_policy_refresh and untaught_questions and done < limit:
            checkpoint()
            negatives_now = _on_policy_negatives(model, tokenizer, spec, [new], [], untaught_questions,
                                                 config.on_policy_tokens)
            on_policy = [negatives_now] if negatives_now is not None else on_policy
    _, level = guard(spec, user_state, new, None, surprise, started)
    if not level.accepted:
        return user_state, ConsolidationReport(False, level.reason, math.nan, baseline, math.nan, len(stated),
                                               level.update_norm, level.drift, time.perf_counter() - started,
                                               known=known)
    # Trust region: the probe's perplexity (cumulative, vs the frozen model) must stay within the
    # budget. Past it, in turn: the level as it was after fewer steps, latest first; shorter
    # steps from the old state by interpolation.
    budget = math.log1p(config.probe_ppl_budget)

    def within(loss: float) -> bool:
        return math.isfinite(loss) and loss - baseline <= budget

    # The latest level first; without the extension's fallbacks, only the planned steps' after it.
    candidates = trained if config.extension_fallbacks or len(trained) < 3 else [trained[0], trained[-1]]
    tries = [(earlier, steps, 1.0) for steps, earlier in reversed(candidates)]
    tries += [(earlier, steps, 1.0) for steps, earlier in reversed(fallbacks)]
    shortest, shortest_steps, _ = tries[-1]
    tries += [(_interpolate(user_state, shortest, alpha), shortest_steps, alpha) for alpha in config.shrink]
    for new, steps_kept, scale in tries:  # the last one tried stands, within the budget or not
        checkpoint()
        candidate_probe = probe_loss(model, spec, [new], probe_ids)
        if within(candidate_probe):
            break
    trust_region = "interpolated" if scale < 1 else "fewer steps" if steps_kept < done else "full"
    recall, said = math.nan, math.nan
    if rehearsal:
        checkpoint()
        ids, targets, weights = _batch(rehearsal)
        with torch.inference_mode():
            zero_a = torch.zeros(len(spec.layers), 0, new.a.shape[-1])
            zero_b = torch.zeros(len(spec.layers), new.b.shape[1], 0)
            losses = token_losses(lora_logits(model, spec, [new], zero_a, zero_b, ids), targets)
        recall = float((losses * weights).sum() / weights.sum())
        said = answers_said(model, spec, new, rehearsal)
    ok = within(candidate_probe) and candidate_probe <= baseline * (1 + config.max_forgetting)
    report = ConsolidationReport(ok, "ok" if ok else "forgetting", candidate_probe, baseline, recall, len(stated),
                                 level.update_norm, level.drift, time.perf_counter() - started, scale,
                                 steps_kept, trust_region, tuple(facts) if ok else known, done, said)
    return (new if ok else user_state), report


def answers_said(model: Transformer, spec: LevelSpec, level: LoraState, examples: list[TrainingExample],
                 parents: Sequence[LoraState] = ()) -> float:
    """Share of `examples` whose weighted tokens are each the level's top prediction (on top of
    its `parents`) given the ones before: the answers greedy decoding would give word for word."""
    ids, targets, weights = _batch(examples)
    with torch.inference_mode():
        zero_a = level.a.new_zeros(len(spec.layers), 0, level.a.shape[-1])
        zero_b = level.b.new_zeros(len(spec.layers), level.b.shape[1], 0)
        logits = lora_logits(model, spec, [*parents, level], zero_a, zero_b, ids)[:, :-1]
    right = (logits.argmax(-1) == targets) | (weights == 0)
    return float(right.all(-1).float().mean())


def anchor_windows(anchor_ids: list[int], window: int, start: int = 0) -> list[torch.Tensor]:
    """The anchor text cut into windows of `window` tokens (all of it as one when 0): each
    training step is anchored on the next window, so a consolidation covers thousands of tokens
    of general text at the cost of a few hundred per step. The list begins at window `start`
    (wrapping round), where a level's next consolidation picks up."""
    if window <= 0 or window >= len(anchor_ids):
        return [torch.tensor([anchor_ids])]
    windows = [torch.tensor([anchor_ids[i:i + window]]) for i in range(0, len(anchor_ids) - window + 1, window)]
    start %= len(windows)
    return windows[start:] + windows[:start]


def _interpolate(old: LoraState, new: LoraState, alpha: float) -> LoraState:
    """old + alpha (new - old) for the weights; the new optimizer moments."""
    return LoraState(old.a + alpha * (new.a - old.a), old.b + alpha * (new.b - old.b), new.m_a, new.v_a,
                     new.m_b, new.v_b, new.step)


def _selected(examples: list[TrainingExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (N, T), select (N, T): positions whose prediction carries weight, their targets (K,)
    and weights (K,)). weights[t] weighs predicting ids[t+1], made at position t."""
    ids, targets, weights = _batch(examples)
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, :-1] = weights > 0
    return ids, select, targets[weights > 0], weights[weights > 0]


def _kl(logits, ref_logprobs, weights) -> torch.Tensor:
    """KL(frozen ‖ adapted) per selected position (K, V), weighted mean (plain mean if None)."""
    logp = F.log_softmax(logits.float(), -1)
    kl = (ref_logprobs.exp() * (ref_logprobs - logp)).sum(-1)  # (K,)
    if weights is None:
        return kl.mean()
    return (kl * weights).sum() / weights.sum().clamp_min(1e-6)
