"""benchmarks/locomo.py: LoCoMo's token F1, the BM25 ranking, what is taught and asked, and one
run on the tiny model over a made-up conversation in LoCoMo's format."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import locomo  # noqa: E402


def conversation() -> dict:
    return {
        "speaker_a": "Ana", "speaker_b": "Ben",
        "session_1_date_time": "1:00 pm on 3 May, 2023",
        "session_1": [
            {"speaker": "Ana", "dia_id": "D1:1", "text": "I adopted a grey rabbit called Biscuit."},
            {"speaker": "Ben", "dia_id": "D1:2", "text": "Lovely! I started painting sunsets.",
             "blip_caption": "a photo of a sunset"},
        ],
        "session_2_date_time": "9:00 am on 10 May, 2023",
        "session_2": [
            {"speaker": "Ana", "dia_id": "D2:1", "text": "Biscuit chewed my violin case."},
            {"speaker": "Ben", "dia_id": "D2:2", "text": "I moved to Porto last week."},
        ],
        "session_3_date_time": "2:00 pm on 1 June, 2023",  # dated but empty, as in the release
        "qa": [
            {"question": "What did Ana call her rabbit?", "answer": "Biscuit", "evidence": ["D1:1"], "category": 4},
            {"question": "Where did Ben move?", "answer": "Porto", "evidence": ["D2:2"], "category": 4},
            {"question": "What does Ben paint?", "evidence": ["D1:2"], "category": 5, "adversarial_answer": "x"},
            {"question": "What did Ana adopt and play?", "answer": "rabbit, violin",
             "evidence": ["D1:1", "D2:1"], "category": 1},
        ],
    }


def test_token_f1_normalises_case_punctuation_and_articles():
    assert locomo.token_f1("The Pacific Ocean!", "pacific ocean") == 1.0
    assert locomo.token_f1("in Porto, Portugal", "Porto") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert locomo.token_f1("Lisbon", "Porto") == 0.0
    assert locomo.token_f1("", "Porto") == 0.0


def test_multi_hop_averages_the_gold_parts():
    assert locomo.multi_f1("a rabbit, and a violin", "rabbit, violin") == 1.0
    assert locomo.multi_f1("a rabbit", "rabbit, violin") == 0.5


def test_category_rules():
    assert locomo.score("It was not mentioned.", {"category": 5}) == 1.0
    assert locomo.score("Biscuit", {"category": 5}) == 0.0
    assert locomo.score("hiking", {"category": 3, "answer": "hiking; probably outdoors"}) == 1.0
    assert locomo.score("7 May 2023", {"category": 2, "answer": 2023}) == pytest.approx(0.5)


def test_bm25_ranks_the_turn_sharing_rare_words_first():
    docs = ["I like cats and dogs.", "Caroline went to the LGBTQ support group yesterday.", "The the the the."]
    assert locomo.bm25_rank("When did Caroline go to the support group?", docs)[0] == 1
    assert locomo.bm25_rank("dogs", docs)[0] == 0
    assert sorted(locomo.bm25_rank("nothing matches", docs)) == [0, 1, 2]


def test_sessions_questions_and_messages():
    conv = conversation()
    assert locomo.dated_sessions(conv) == [1, 2]
    assert locomo.select_questions(conv, [1], (1, 2, 4), 10) == [0]
    assert locomo.select_questions(conv, [1, 2], (1, 2, 4), 10) == [0, 1, 3]
    assert locomo.select_questions(conv, [1, 2], (1, 2, 4), 2) == [0, 1]
    assert locomo.select_questions(conv, [1, 2], (5,), 10) == [2]
    messages = locomo.session_messages(conv, 1)
    assert [m["role"] for m in messages] == ["user", "user"]
    assert messages[0]["content"] == "(1:00 pm on 3 May, 2023) Ana: I adopted a grey rabbit called Biscuit."
    assert messages[1]["content"] == "Ben: Lovely! I started painting sunsets. [shares a photo: a photo of a sunset]"


def test_missing_data_names_the_flag_and_the_source(tmp_path):
    with pytest.raises(SystemExit) as exc:
        locomo.load_conversations(tmp_path / "absent")
    assert "--data" in str(exc.value) and "locomo" in str(exc.value).lower()


def test_a_run_on_the_tiny_model(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "7.json").write_text(json.dumps(conversation()))
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["locomo.py", "--data", str(data), "--model", "tiny", "--sessions", "2",
                                      "--max-tokens", "4", "--json", str(out)])
    locomo.main()
    result = json.loads(out.read_text())
    assert result["conversations"][0]["question_ids"] == ["7:0", "7:1", "7:3"]
    assert [s["number"] for s in result["conversations"][0]["sessions"]] == [1, 2]
    assert set(result["f1"]) == set(locomo.METHODS)
    assert result["f1"]["learned"]["overall"]["n"] == 3
    assert isinstance(result["locomo_f1_learned_minus_retrieval"], float)
    assert len(result["conversations"][0]["consolidation"]) == 2
