"""Uploaded case folders: a zip, checked before anything in it is used.

Refused with one line naming the archive and the member or field: not a zip, a member whose path
would land outside the upload folder (zip-slip: absolute, `..`, drive letters, symlinks), more
unpacked data than allowed, no `case.yaml`, a `case.yaml` that `core.case.load_case` rejects, or a
study file that is not in the archive.
"""
from __future__ import annotations

import re
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from core.case import CASE_FILE, load_case
from core.errors import CaseDataError
from core.validate import validate_case_folder

MAX_MEMBERS = 20_000
UNPACK_FACTOR = 10  # unpacked data may be this many times the upload limit (DICOM compresses well)
_IGNORED = ("__MACOSX/",)


class UploadError(ValueError):
    """A one-line reason an upload cannot be used."""


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    p = PurePosixPath(name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        return "absolute or Windows path"
    if ".." in p.parts:
        return "path escapes the case folder (..)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic links are not allowed"
    return None


def extract_case_zip(data: BinaryIO, name: str, dest: Path, max_bytes: int) -> Path:
    """Unpack `data` (a zip named `name`) into the new folder `dest`; returns the case folder in it.

    On any problem `dest` is removed and UploadError says what, naming the archive member or field.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    try:
        return _extract(data, name, dest.resolve(), max_bytes)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _extract(data: BinaryIO, name: str, dest: Path, max_bytes: int) -> Path:
    try:
        zf = zipfile.ZipFile(data)
    except (zipfile.BadZipFile, OSError):
        raise UploadError(f"{name}: not a zip archive (zip the case folder)") from None
    with zf:
        members = [m for m in zf.infolist() if not m.filename.startswith(_IGNORED)]
        if len(members) > MAX_MEMBERS:
            raise UploadError(f"{name}: {len(members)} files; at most {MAX_MEMBERS} are accepted")
        budget = max_bytes * UNPACK_FACTOR
        total = 0
        for m in members:  # check everything before writing anything
            problem = _member_problem(m)
            if problem:
                raise UploadError(f"{name}: {m.filename}: {problem}")
            total += m.file_size
            if total > budget:
                raise UploadError(f"{name}: unpacks to more than {budget / 2**20:.0f} MB")
        written = 0
        for m in members:
            target = (dest / m.filename).resolve()
            if target != dest and dest not in target.parents:  # belt and braces after the name checks
                raise UploadError(f"{name}: {m.filename}: path escapes the case folder")
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(m) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > budget:  # a member that lies about its size
                            raise UploadError(f"{name}: unpacks to more than {budget / 2**20:.0f} MB")
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as e:
                raise UploadError(f"{name}: {m.filename}: cannot unpack ({e})") from None
    return _find_case(dest, name)


def _find_case(dest: Path, name: str) -> Path:
    found = sorted({p.parent for p in dest.glob(CASE_FILE)} | {p.parent for p in dest.glob(f"*/{CASE_FILE}")})
    if not found:
        raise UploadError(f"{name}: {CASE_FILE}: not found (zip one case folder: {CASE_FILE} at the top "
                          f"or in one folder)")
    if len(found) > 1:
        raise UploadError(f"{name}: {CASE_FILE}: {len(found)} cases in one archive; upload one case")
    folder = found[0]

    def rel(e: CaseDataError) -> str:
        try:
            where = Path(e.file).resolve().relative_to(dest).as_posix()
        except ValueError:
            where = Path(e.file).name
        return f"{name}: {where}: {e.field}: {e.problem}"

    try:
        case = load_case(folder)
    except CaseDataError as e:
        raise UploadError(rel(e)) from None
    if set(case.id) == {"."}:
        raise UploadError(f"{name}: {(folder / CASE_FILE).relative_to(dest).as_posix()}: id: "
                          f"{case.id!r} is not a usable case id")
    problems = validate_case_folder(folder, check_images=False)  # e.g. a study file missing from the zip
    if problems:
        raise UploadError(rel(problems[0]))
    return folder
