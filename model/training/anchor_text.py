"""The anchor-text writer: the general text the memory levels are anchored to (`nsam anchor-text`).

The frozen model writes it itself (sampled replies to "write a paragraph about ..." prompts):
KL to the frozen model on its own samples estimates how far a level moved its distribution, and
thousands of tokens of it, a few hundred per training step, cover far more than a hand-written
paragraph. Deterministic for a seed; the package ships the output as `model/presets/anchor.txt`
(a live turn's anchor). `--plain` continues each bare topic title outside the chat template
instead: the model's own prose, consolidation's anchor (`anchor_plain.txt`; the shipped file is
seed 0 with one profane sentence taken out by hand).
The accept/reject probe (`probe.txt`, 1.1k tokens) stays hand-written prose, held out from training.
"""

from __future__ import annotations

from pathlib import Path

from ..runtime import NsamModel, SamplingParams

TOPICS = (
    "rivers", "the history of bread", "how bridges are built", "volcanoes", "the post office", "honeybees",
    "chess", "the moon", "railways in the nineteenth century", "coral reefs", "how a bicycle works",
    "the printing press", "winter in the mountains", "a small fishing village", "the human heart",
    "libraries", "clouds and rain", "ancient Rome", "how glass is made", "a city market", "owls",
    "the invention of the telephone", "football", "deserts", "how vaccines work", "a lighthouse",
    "the violin", "electricity at home", "forests in autumn", "the Silk Road", "tea", "whales",
    "a school day", "the French Revolution", "how plants grow", "maps and map making", "a thunderstorm",
    "castles", "the stock market", "a family dinner", "the solar system", "wool and weaving",
    "a museum visit", "earthquakes", "the history of writing", "a cup of coffee", "penguins", "the Olympic games",
)


PRESETS = Path(__file__).parents[1] / "presets"


def write_anchor_text(model: NsamModel, out_dir: Path, tokens: int = 160, temperature: float = 1.0,
                      seed: int = 0, batch: int = 8, plain: bool = False) -> tuple[Path, int]:
    """Writes one paragraph per topic (`tokens` each) and returns the file and its token count.
    `plain`: continue a bare title instead of answering a chat request: the model's prose outside
    the chat template, where most text it will see lies."""
    gen = model.generator(batch, learning=False)
    texts = {t: "" for t in TOPICS}
    fresh = model.new_session_state(None)
    for i, topic in enumerate(TOPICS):
        if plain:
            ids = model.tokenizer.encode(f"{topic[0].upper()}{topic[1:]}\n\n")
        else:
            ids = model.encode_chat([{"role": "user", "content": f"Write a paragraph about {topic}."}], 512)
        gen.add(topic, ids, fresh, SamplingParams(max_tokens=tokens, temperature=temperature,
                                                 top_p=0.95, seed=seed + i))
    while gen.has_work():
        for event in gen.step():
            texts[event.request_id] += event.text
    paragraphs = [" ".join(texts[t].split()) for t in TOPICS]
    out = out_dir / ("anchor_plain.txt" if plain else "anchor.txt")
    out.write_text("\n".join(p for p in paragraphs if p) + "\n", encoding="utf-8")
    return out, sum(model.count_tokens(p) for p in paragraphs)
