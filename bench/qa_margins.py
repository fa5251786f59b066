"""Where the bf16 span reader's settle margin comes from: how often OpenVINO's bf16 answer differs
from float32's, by how much the bf16 answer led, and what each margin costs.

For each set (a seed of ``bench/qa.py``'s pairs: 200 (context, question) pairs over ~300-token
contexts, asked three times with different question suffixes: 600 answers), every answer is
computed by the bf16 graph and by the float32 one on the same windows. A margin m redoes, in
float32, the answers whose bf16 lead over the runner-up is below m; the table gives the share
redone and the share then identical to float32 (the pipeline's answer: ``bench/qa.py`` checks
that float32 matches it), per set. ``--unmarked`` measures the graph as built but never read back
from IR, where OpenVINO runs every node in bfloat16 (what the reader falls back to, with
``BF16_MARGIN``, when the graph's float32 marks do not hold).
Run: ``python bench/qa_margins.py`` (after the README's test set-up; a few minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qa import build_checkpoint, make_pairs

MARGINS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.15, 0.20)


def answer_set(reader: Any, model: Any, seed: int) -> list[tuple[bool, float]]:
    """(bf16 answer == float32 answer, bf16 lead) for the 600 answers of one set."""
    contexts, pairs = make_pairs(200, model.tokenizer, seed=seed)
    records = {k: reader.prepare(k, t) for k, t in contexts.items()}
    rows = []
    for r in range(3):
        items = [(q if r == 0 else f"{q} {r}", records[c]) for c, q in pairs]
        for s in range(0, len(items), 16):
            chunk = items[s : s + 16]
            encoded = model.tokenizer([q for q, _ in chunk], add_special_tokens=False)["input_ids"]
            windows = []
            for i, ids in enumerate(encoded):
                windows.extend(reader._windows(i, list(ids), len(chunk[i][1].ids)))
            fast = reader._forward(windows, chunk, model)
            exact = reader._forward(windows, chunk, model, precise=True)
            for i, (_, rec) in enumerate(chunk):
                a, lead = reader._best(i, rec, windows, fast)
                b, _ = reader._best(i, rec, windows, exact)
                rows.append((a == b, lead))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", default="1,2,3,4,5,6")
    parser.add_argument("--unmarked", action="store_true", help="every node in bfloat16")
    args = parser.parse_args(argv)

    from keymiss.qa import graph
    from keymiss.qa.backends import load_openvino_qa_model
    from keymiss.qa.reader import SpanReader

    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(os.path.join(tmp, "minilm-qa"))
        model = load_openvino_qa_model(path, dtype="bf16", cache=os.path.join(tmp, "graphs"))
        if model.precise_model is None:
            print("this CPU runs no bf16: nothing to settle")
            return 0
        if args.unmarked:
            mapped = graph.Mapped(os.path.join(path, "model.safetensors"))
            model.fast = graph.Compiled(graph.build_bert(path, "span", mapped), "bf16", mapped)
        reader = SpanReader(model)
        reader.verify = None  # both paths are computed for every answer: nothing is settled
        seeds = [int(s) for s in args.seeds.split(",")]
        sets = {seed: answer_set(reader, model, seed) for seed in seeds}
    kind = "every node in bfloat16" if args.unmarked else "residual stream, layer norms, span head float32"
    print(f"# bf16 vs float32 span answers ({kind}): {len(seeds)} sets of 600\n")
    print("| margin | redone (per set) | identical to float32 (per set) | identical, worst set |")
    print("| ---: | --- | --- | ---: |")
    for m in MARGINS:
        redo = [sum(lead < m for _, lead in rows) / len(rows) for rows in sets.values()]
        same = [sum(ok or lead < m for ok, lead in rows) / len(rows) for rows in sets.values()]
        print(
            f"| {m:.0%} | {', '.join(f'{x:.1%}' for x in redo)} | "
            f"{', '.join(f'{x:.2%}' for x in same)} | {min(same):.2%} |"
        )
    leads = sorted(lead for rows in sets.values() for ok, lead in rows if not ok)
    listed = ", ".join(f"{x:.3f}" for x in leads)
    print(f"\nbf16 leads of the answers float32 changes ({len(leads)}): {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
