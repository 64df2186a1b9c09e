"""python -m benchmarks.mos prepare | serve | report

prepare  --world DIR --system NAME=HOST:PORT[/MODEL:VERSION] ... --out TASKS_DIR
serve    --tasks TASKS_DIR --db mos.sqlite [--host 127.0.0.1] [--port 8090]
report   --db mos.sqlite          (the aggregate tables as markdown)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import markdown_table


def _markdown(rows: list[dict]) -> str:
    if not rows:
        return "(none yet)"
    return markdown_table(list(rows[0]), [["" if v is None else v for v in r.values()] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mos", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="run looks through each system; write the task folder")
    p.add_argument("--world", required=True, help="a synthetic world (clients/world.py) with looks.json")
    p.add_argument("--system", action="append", required=True, help="NAME=HOST:PORT[/MODEL:VERSION]")
    p.add_argument("--out", required=True)
    p.add_argument("--looks", type=int, default=20)
    p.add_argument("--k", type=int, default=5, help="products shown per layer")
    p.add_argument("--catalog-root", help="where relative product image paths live (default: --world)")
    p = sub.add_parser("serve", help="serve the annotation page")
    p.add_argument("--tasks", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090, help="0: any free port")
    p = sub.add_parser("report", help="print the aggregate tables")
    p.add_argument("--db", required=True)
    args = parser.parse_args(argv)

    if args.command == "prepare":
        from benchmarks.mos.tasks import System, prepare, world_looks

        try:
            systems = [System.parse(s) for s in args.system]
        except ValueError as exc:
            parser.error(str(exc))
        looks = world_looks(Path(args.world), args.looks)
        tasks = prepare(looks, systems, Path(args.out), Path(args.catalog_root or args.world), k=args.k)
        print(f"{len(tasks['items'])} items, {len(tasks['pairs'])} pairs in {args.out}/tasks.json")
    elif args.command == "serve":
        from benchmarks.mos.server import serve

        server = serve(Path(args.tasks), Path(args.db), args.host, args.port)
        host, port = server.server_address[:2]
        print(f"MOS page: http://{host}:{port}/", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    else:
        from benchmarks.mos.report import report
        from benchmarks.mos.store import Store

        r = report(Store(Path(args.db)))
        for title, key in (
            ("Mean scores", "scores"),
            ("Agreement", "agreement"),
            ("Preference", "preferences"),
        ):
            print(f"## {title}\n\n{_markdown(r[key])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
