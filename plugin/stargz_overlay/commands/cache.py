"""Cache and metrics commands: ``gc`` (evict unused content) and ``metrics`` (Prometheus text)."""

import json

from ..config import load_config, parse_size
from ..errors import StargzError


def _config(args):
    return load_config(args.config)


def cmd_gc(args):
    from ..cache import ContentCache, _human
    config = _config(args)
    target = config.directory_cache.max_size or None       # 0 in the config: no limit
    if args.max_size is not None:
        target = parse_size(args.max_size, "--max-size")   # 0 here: evict all unused
    cache = ContentCache(config.cache_dir, max_size=config.directory_cache.max_size,
                         clean=False)
    report = cache.collect(target, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        limit = f"limit {_human(target)}" if target is not None else "no size limit"
        print(f"{cache.root} ({limit}){' [dry run]' if args.dry_run else ''}: "
              f"{report.summary()}")
    return 0


def cmd_metrics(args):
    from ..cache import ContentCache
    from ..metrics import read_snapshots, render
    config = _config(args)
    snaps = read_snapshots(config.metrics_dir, clean=True)
    cache_info = None
    try:
        files, used = ContentCache(config.cache_dir, clean=False).usage()
        cache_info = {"root": config.cache_dir, "files": files, "bytes": used,
                      "max_size": config.directory_cache.max_size}
    except StargzError:
        pass
    if args.json:
        print(json.dumps({"daemons": snaps, "cache": cache_info}, indent=2, sort_keys=True))
        return 0
    extra = []
    if cache_info is not None:
        extra.append(("cache_bytes", {}, cache_info["bytes"]))
    print(render(snaps, extra), end="")
    return 0


def register(subparsers):
    p = subparsers.add_parser(
        "gc", help="evict unused content from the plugin's file cache",
        description="Evict least recently used content until the cache is within the size "
                    "limit.  Content of mounted layers, files open in any process and content "
                    "used in the last minute are never evicted; leftovers of interrupted "
                    "fetches are removed.")
    p.add_argument("--max-size", metavar="SIZE",
                   help="size limit (bytes or e.g. 5GiB; 0 = evict everything unused); "
                        "default: [directory_cache] max_size")
    p.add_argument("--dry-run", action="store_true", help="only say what would be evicted")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--config", metavar="FILE", help="plugin configuration")
    p.set_defaults(func=cmd_gc)

    p = subparsers.add_parser(
        "metrics", help="print the metrics of every running mount (Prometheus text)",
        description="Fetch, cache and layer metrics of the running plugin daemons, read from "
                    "metrics_dir, in the Prometheus text format (or JSON).")
    p.add_argument("--json", action="store_true", help="print the raw snapshots as JSON")
    p.add_argument("--config", metavar="FILE", help="plugin configuration")
    p.set_defaults(func=cmd_metrics)
