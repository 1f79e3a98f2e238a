"""Registry commands: ``inspect REF`` (which layers can be served lazily, and why)."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

from ..auth import AuthFiles
from ..registry import RegistryClient


def _bool(text):
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(text)


def add_client_arguments(parser):
    """The Podman-like options that shape a RegistryClient."""
    parser.add_argument("--tls-verify", type=_bool, default=True, metavar="BOOL",
                        help="verify TLS certificates (default true)")
    parser.add_argument("--authfile", metavar="PATH",
                        help="auth file consulted first (default $REGISTRY_AUTH_FILE, ...)")
    parser.add_argument("--cert-dir", metavar="DIR",
                        help="certs.d-style directory (default /etc/containers/certs.d)")
    parser.add_argument("--registries-conf", metavar="PATH",
                        help="registries.conf to use (default $CONTAINERS_REGISTRIES_CONF or "
                             "the system one)")
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="platform to pick from an index (default: this machine)")


def client_from_args(args):
    auth_files = None
    if args.authfile:
        auth_files = AuthFiles(env={**os.environ,
                                    "REGISTRY_AUTH_FILE": args.authfile})
    return RegistryClient(registries_conf=args.registries_conf, auth_files=auth_files,
                          certs_dir=args.cert_dir, tls_verify=args.tls_verify,
                          platform=args.platform)


def inspect_image(client, reference):
    """Resolve ``reference`` and classify every layer; a JSON-ready dict."""
    image = client.resolve(reference)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(image.layers)))) as pool:
        kinds = list(pool.map(lambda la: client.classify_layer(image, la), image.layers))
    layers = []
    for i, (layer, kind) in enumerate(zip(image.layers, kinds)):
        layers.append({"index": i, "digest": layer.digest, "size": layer.size,
                       "mediaType": layer.media_type, "kind": kind.kind or "not-stargz",
                       "lazy": kind.kind is not None, "reason": kind.reason,
                       "tocDigest": layer.toc_digest, "tocOffset": kind.toc_offset,
                       "uncompressedSize": layer.uncompressed_size})
    return {"reference": image.reference, "source": image.source,
            "manifestDigest": image.manifest_digest, "indexDigest": image.index_digest,
            "mediaType": image.media_type, "platform": image.platform, "layers": layers}


def cmd_inspect(args):
    with client_from_args(args) as client:
        info = inspect_image(client, args.reference)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lazy = sum(1 for la in info["layers"] if la["lazy"])
    print(f"reference: {info['reference']}")
    if info["source"] != info["reference"]:
        print(f"pulled from: {info['source']}")
    print(f"manifest:  {info['manifestDigest']} ({info['mediaType']})")
    if info["indexDigest"]:
        print(f"index:     {info['indexDigest']}")
    print(f"platform:  {info['platform']}")
    print(f"layers:    {len(info['layers'])} ({lazy} lazily usable)")
    for la in info["layers"]:
        print(f"  {la['index']:>3}  {la['digest']}  {la['size']:>12}  {la['kind']:<11} "
              f"{la['reason']}")
    return 0


def register(subparsers):
    p = subparsers.add_parser(
        "inspect", help="show an image's manifest and which layers are eStargz/stargz",
        description="Resolve REF (docker://REF or host/repo:tag, Podman rules) and list its "
                    "layers: size, and whether each is eStargz, legacy stargz or neither "
                    "(with the reason).")
    p.add_argument("reference", metavar="REF")
    add_client_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
