"""Check our SAELens export/import against the real SAELens (a benchmark-only extra).

Run in the peers venv (`make bench-peers` creates it):

    .venv-peers/bin/python benchmarks/check_saelens_interop.py

For every architecture: export a trained-looking random SAE with `export_saelens`, load it with
SAELens's own `SAE.load_from_disk`, and compare SAELens's encode/decode to ours on the same
inputs; then save from SAELens and read it back with `import_saelens`. Writes
benchmarks/results/saelens_interop.json with the max absolute differences.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.dictionaries import SAEConfig, build_sae  # noqa: E402
from analysis.dictionaries.saelens import export_saelens, import_saelens  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "saelens_interop.json"


def _random_sae(arch: str, d: int = 32, width: int = 128):
    kw = {"k": 8} if arch in ("topk", "batchtopk") else {}
    sae = build_sae(SAEConfig(d_in=d, width=width, architecture=arch, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # nonzero biases and thresholds, so every term is exercised
        sae.b_enc.copy_(0.1 * torch.randn(width, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.log(0.05 + 0.1 * torch.rand(width, generator=g)))
        if arch == "batchtopk":
            sae.inference_threshold.fill_(0.08)
    return sae


def main() -> None:
    import sae_lens
    from sae_lens import SAE

    torch.manual_seed(0)
    x = torch.randn(256, 32)
    rows = []
    for arch in ("topk", "batchtopk", "relu", "jumprelu"):
        sae = _random_sae(arch)
        with tempfile.TemporaryDirectory() as tmp:
            export_saelens(sae, tmp)
            theirs = SAE.load_from_disk(tmp)
            with torch.no_grad():
                ours_z = sae.dense_latents(x)
                their_z = theirs.encode(x)
                ours_x = sae(x).x_hat
                their_x = theirs.decode(their_z)
            back_dir = Path(tmp) / "resaved"
            theirs.save_model(str(back_dir))
            back = import_saelens(back_dir)
            with torch.no_grad():
                round_trip = float((back(x).x_hat - ours_x).abs().max())
        rows.append({"architecture": arch, "saelens_class": type(theirs).__name__,
                     "max_abs_diff_latents": float((ours_z - their_z).abs().max()),
                     "max_abs_diff_reconstruction": float((ours_x - their_x).abs().max()),
                     "max_abs_diff_after_saelens_save_and_our_import": round_trip})
        print(rows[-1])
    ok = all(max(r[k] for k in r if k.startswith("max_abs")) < 1e-5 for r in rows)
    RESULTS.write_text(json.dumps({"sae_lens": sae_lens.__version__, "torch": torch.__version__,
                                   "python": platform.python_version(), "all_within_1e-5": ok, "rows": rows},
                                  indent=2))
    print("all within 1e-5:", ok)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
