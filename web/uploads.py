"""Uploaded cases: a zipped case folder, or images and a form. Checked before anything in them is used.

A zip is refused with one line naming the archive and the member or field: not a zip, a member whose
path would land outside the upload folder (zip-slip: absolute, `..`, drive letters, symlinks), more
unpacked data than allowed, no `case.yaml`, a `case.yaml` that `core.case.load_case` rejects, or a
study file that is not in the archive.

Images and a form become a case folder written here (`case.yaml` built from the form fields through
`core.case`'s schema; each image saved under a name we choose, never the uploaded one). Refused with
one line naming the form field or the image: a missing or invalid field, an unknown file type, a
modality that does not take that file type, or an image that does not load.
"""
from __future__ import annotations

import re
import shutil
import stat
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Mapping

from core.case import CASE_FILE, FORMATS_BY_MODALITY, Modality, StudyFormat, load_case, parse_case, write_case
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


# ---------------------------------------------------------------- images + a form
MAX_IMAGES = 8
MAX_FIELD_CHARS = 4000
VITALS = ("heart_rate", "resp_rate", "temperature_c", "systolic_bp", "diastolic_bp", "spo2")
FORM_FIELDS = ("case_id", "age", "sex", "complaint", "history", "body_region", "labs", "prior_report", *VITALS)
# file type -> (modality when the form says "auto", format); one .dcm file is a radiograph (a CT or MR
# DICOM series is a folder of files: zip the case folder for that)
BY_SUFFIX: dict[str, tuple[Modality, StudyFormat]] = {
    ".png": (Modality.XR, StudyFormat.PNG), ".dcm": (Modality.XR, StudyFormat.DICOM),
    ".nii": (Modality.CT, StudyFormat.NIFTI), ".nii.gz": (Modality.CT, StudyFormat.NIFTI),
    ".svs": (Modality.WSI, StudyFormat.SVS), ".tif": (Modality.WSI, StudyFormat.TIFF),
    ".tiff": (Modality.WSI, StudyFormat.TIFF),
}
_LAB = re.compile(r"^(?P<name>[^:]+):\s*(?P<value>[-+]?\d+(?:\.\d+)?)\s*(?P<unit>[^()]*?)\s*"
                  r"(?:\((?:ref(?:erence)?\s*)?(?P<ref>[^)]*)\))?$")


def _suffix(name: str) -> str:
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


def _labs(text: str) -> list[dict]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        m = _LAB.match(line)
        if m is None:
            raise UploadError(f"form: labs: line {n} {line[:80]!r}: write it as 'name: value unit (reference)', "
                              f"e.g. 'C-reactive protein: 183 mg/L (<5)'")
        lab = {"name": m["name"].strip(), "value": float(m["value"]), "unit": m["unit"].strip()}
        if m["ref"]:
            lab["reference"] = m["ref"].strip()
        out.append(lab)
    return out


def case_from_form(fields: Mapping[str, str], images: list[tuple[str, BinaryIO, str]], dest: Path,
                   max_bytes: int) -> Path:
    """A case folder in the new folder `dest` from form fields and `(file name, data, modality)` images
    (modality "auto" or "" takes it from the file type). Returns the case folder.

    On any problem `dest` is removed and UploadError names the form field or the image.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    try:
        return _from_form(fields, images, dest.resolve(), max_bytes)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _from_form(fields: Mapping[str, str], images: list[tuple[str, BinaryIO, str]], dest: Path,
               max_bytes: int) -> Path:
    f = {k: str(fields.get(k) or "").strip() for k in FORM_FIELDS}
    for k, v in f.items():
        if len(v) > MAX_FIELD_CHARS:
            raise UploadError(f"form: {k}: longer than {MAX_FIELD_CHARS} characters")
    if not images:
        raise UploadError("form: images: add at least one image (radiograph .png/.dcm, CT or MR .nii/.nii.gz, "
                          "slide .svs/.tif)")
    if len(images) > MAX_IMAGES:
        raise UploadError(f"form: images: {len(images)} files; at most {MAX_IMAGES} are accepted "
                          f"(zip the case folder for more)")
    case_id = f["case_id"] or f"upload-{uuid.uuid4().hex[:8]}"
    folder = dest / "case"
    folder.mkdir()
    studies, count, written, names = [], {}, 0, {}
    for i, (name, data, modality) in enumerate(images):
        name = Path(name or "").name or f"image {i + 1}"
        label = f"images[{i}] {name}"
        suffix = _suffix(name)
        if suffix not in BY_SUFFIX:
            raise UploadError(f"{label}: file type {suffix or '(none)'!r} is not accepted; use one of "
                              f"{', '.join(BY_SUFFIX)}")
        mod, fmt = BY_SUFFIX[suffix]
        if modality and modality != "auto":
            try:
                mod = Modality(modality)
            except ValueError:
                raise UploadError(f"{label}: modality: {modality!r} is not one of "
                                  f"{', '.join(m.value for m in Modality)}") from None
            if fmt not in FORMATS_BY_MODALITY[mod]:
                raise UploadError(f"{label}: modality: a {mod.value} study is not a {suffix} file "
                                  f"({', '.join(sorted(x.value for x in FORMATS_BY_MODALITY[mod]))})")
        count[mod] = count.get(mod, 0) + 1
        studies.append((mod, fmt, suffix, name, data))
    per_modality = dict(count)
    seen: dict[Modality, int] = {}
    out_studies = []
    for mod, fmt, suffix, name, data in studies:
        seen[mod] = seen.get(mod, 0) + 1
        sid = mod.value.lower() + (str(seen[mod]) if per_modality[mod] > 1 else "")
        target = folder / f"{sid}{suffix}"  # our name, never the uploaded one
        with open(target, "wb") as out:
            while chunk := data.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise UploadError(f"form: images: more than {max_bytes / 2**20:g} MB")
                out.write(chunk)
        names[target.name] = name
        out_studies.append({"id": sid, "modality": mod.value, "body_region": f["body_region"] or "chest",
                            "path": target.name, "format": fmt.value,
                            "description": f"{mod.value} uploaded as {name[:100]}"})
    presentation = {"complaint": f["complaint"], "history": f["history"],
                    "vitals": {k: f[k] for k in VITALS if f[k]}, "labs": _labs(f["labs"])}
    data = {"id": case_id, "patient": {"age": f["age"], "sex": f["sex"]}, "presentation": presentation,
            "studies": out_studies}
    if f["prior_report"]:
        data["prior_report"] = f["prior_report"]
    try:
        case = parse_case(data, "form")
    except CaseDataError as e:
        raise UploadError(f"form: {'case_id' if e.field == 'id' else e.field}: {e.problem}") from None
    write_case(case, folder)
    problems = validate_case_folder(folder, check_images=True)  # every image must load
    if problems:
        e = problems[0]
        where = Path(e.file).name
        raise UploadError(f"images: {names.get(where, where)}: {e.field}: {e.problem}")
    return folder
