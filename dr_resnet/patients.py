"""Which patient an image belongs to: the one definition that the patient-level split, the held-out draw,
the bootstrap, the train/test overlap check and the paired comparisons all read. Torch- and numpy-free.

EyePACS-style names carry the patient: `<patient>_left` / `<patient>_right`, in any case, with or
without an image extension or folders (`train/10_LEFT.jpeg` is patient 10). A table may name the patient
in a column instead (`data.patient_column`): then that column is the identity. A name with no eye in it
(APTOS ids, IDRiD) is its own patient: such a dataset is per image, and the bootstrap resamples images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from dr_resnet.registry import IMAGE_EXTENSIONS

EYES = ("left", "right")


def patient_of(name: str) -> str:
    """'10_left' / '10_Right.jpeg' / 'train/10_LEFT' -> '10'; a name without an eye suffix is its own patient
    (its folders and image extension dropped)."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    stem, extension = os.path.splitext(base)
    if extension.lower() in IMAGE_EXTENSIONS:
        base = stem
    lower = base.lower()
    for eye in EYES:
        if lower.endswith("_" + eye):
            return base[: -len(eye) - 1]
    return base


def patients_of(names: Sequence[str], explicit: Sequence[str] | None = None) -> list[str]:
    """Each image's patient: the explicit ids where a table gives them (one per image), else from its name."""
    if explicit is not None:
        if len(explicit) != len(names):
            raise ValueError(f"{len(explicit)} patient ids for {len(names)} images: one each")
        return [str(p) for p in explicit]
    return [patient_of(n) for n in names]


def per_image(patients: Sequence[str]) -> bool:
    """Whether no two images share a patient (the names carry no patient, or every patient has one image)."""
    return len(set(patients)) == len(patients)


def shared_patients(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """The patients with images on both sides, sorted."""
    return sorted(set(a) & set(b))


def identity_of(patients: Sequence[str], source: str = "") -> str:
    """How a split's patients were told apart, in words for the log and summary.json (`source`: where they
    came from when not from the names, e.g. "the table's column 'subject'")."""
    if source:
        return f"from {source}"
    if per_image(patients):
        return "per image (the names carry no patient: each image counts as its own patient)"
    return "from the image names (<patient>_left / <patient>_right)"


def overlap(train: Sequence[str], test: Sequence[str], held_out: Sequence[str] = (), source: str = "") -> dict:
    """What summary.json records of the splits' patients: how they were identified, and the patients with
    images on both sides of training and test (and of training and its held-out part), with an example."""
    in_test, in_held_out = shared_patients(train, test), shared_patients(train, held_out)
    return {"identity": identity_of([*train, *held_out], source), "train_patients": len(set(train)),
            "test_patients": len(set(test)), "patients_in_train_and_test": len(in_test),
            "patients_in_train_and_held_out": len(in_held_out),
            "example": (in_test or in_held_out or [""])[0]}


def overlap_warnings(found: dict, test_split: str = "test") -> list[str]:
    """One line per shared side of `overlap`'s result (none when the patients are apart)."""
    lines = []
    if found["patients_in_train_and_test"]:
        lines.append(f"{found['patients_in_train_and_test']} of the {found['test_patients']} patients of the "
                     f"'{test_split}' split also have images in training (e.g. patient {found['example']!r}): test "
                     f"figures may be optimistic; split by patient (python -m dr_resnet.split) for figures to publish")
    if found["patients_in_train_and_held_out"]:
        lines.append(f"{found['patients_in_train_and_held_out']} patients have images in both training and its "
                     f"held-out part: the epoch selection may be optimistic")
    return lines
