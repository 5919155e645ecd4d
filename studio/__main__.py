"""Start the studio: `python -m studio --run runs/demo`, then open the printed address."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from core.errors import UserError, main_guard
from core.pretrained import is_export
from core.processes import check_device
from studio.engine import Engine
from studio.server import StudioServer


def model_paths(run: str | None, tokenizer: str | None, maskgit: str | None) -> tuple[Path, Path]:
    """The pair to load: RUN's checkpoints, the folders export.py wrote to RUN, or the paths given."""
    if run:
        tok, mg = Path(run) / "tokenizer", Path(run) / "maskgit"
        if not is_export(mg):  # a run directory: its checkpoints
            tok, mg = tok / "checkpoint.pt", mg / "checkpoint.pt"
    else:
        tok, mg = Path(tokenizer), Path(maskgit)
    for path in (tok, mg):
        if not path.exists():
            raise UserError(f"{path} not found" + (f": is {run} a finished run (e.g. `make demo`)?" if run else ""))
    return tok, mg


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m studio", description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run directory holding tokenizer/checkpoint.pt and "
                   "maskgit/checkpoint.pt, or the folder export.py writes (tokenizer/ and maskgit/ exports)")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint or exported folder (instead of --run)")
    p.add_argument("--maskgit", default=None, help="MaskGIT checkpoint or exported folder (instead of --run)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the "
                   "model to the network without authentication (see the README)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--raw-weights", action="store_true", help="use raw instead of EMA weights")
    args = p.parse_args()
    if args.run and (args.tokenizer or args.maskgit):
        p.error("give --run or --tokenizer/--maskgit, not both")
    if not args.run and not (args.tokenizer and args.maskgit):
        p.error("give --run RUN_DIR, or both --tokenizer and --maskgit")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must lie in [0, 65535] (0: any free port), got {args.port}")
    device = check_device(args.device)
    tokenizer, maskgit = model_paths(args.run, args.tokenizer, args.maskgit)

    engine = Engine.from_paths(tokenizer, maskgit, ema=not args.raw_weights, device=device)
    try:
        server = StudioServer(engine, args.host, args.port)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; try another --port") from None
    if not server.loopback:
        print(f"studio: WARNING: listening on {args.host}: anyone who can reach this address can use the model; "
              "there is no authentication")
    print(f"studio: {engine.source} on {engine.device}\nstudio: open {server.url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main_guard(main)
