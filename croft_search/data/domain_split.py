"""Leave-one-domain-out splits in the PACS layout (`NAME/test_on_<domain>.json`)."""

from __future__ import annotations

from pathlib import Path

from croft_search.data.base import DomainSplit, Sample
from croft_search.data.locate import dataset_dir
from croft_search.data.registry import DatasetSpec, get_dataset_spec, require_kind
from croft_search.data.split_file import (
    SPLIT_PARTS,
    SplitRow,
    check_images_exist,
    classnames_by_label,
    image_relpath,
    read_split_file,
)
from croft_search.errors import DataError


def split_file_name(domain: str) -> str:
    """VLCS's folders are upper-case (CALTECH) but its split files are not
    (test_on_caltech.json); PACS's domains are lower-case already."""
    return f"test_on_{domain.lower()}.json"


def load_domain_split(name: str, root: Path, target_domain: str) -> DomainSplit:
    """Train/val (source domains) and test (`target_domain`) of dataset `name` under the
    data root `root`, every listed image checked to exist."""
    spec = get_dataset_spec(name)
    require_kind(spec, "domain_split", "load_domain_split")
    target = spec.canonical_domain(target_domain)
    folder = dataset_dir(spec, root)
    split_path = folder / split_file_name(target)
    parts = read_split_file(split_path, required=SPLIT_PARTS)
    classnames = classnames_by_label(parts.values(), split_path, contiguous=True)
    image_dir = folder / spec.image_subdir
    samples = {
        part: tuple(
            _sample(row, image_dir, spec, f"{split_path}: {part} row {index}")
            for index, row in enumerate(parts[part])
        )
        for part in SPLIT_PARTS
    }
    _check_leave_one_domain_out(samples, target, split_path)
    check_images_exist(
        (sample.path for part in samples.values() for sample in part), split_path, image_dir
    )
    return DomainSplit(
        dataset=spec.name,
        target_domain=target,
        source_domains=tuple(domain for domain in spec.domains if domain != target),
        classnames=classnames,
        train=samples["train"],
        val=samples["val"],
        test=samples["test"],
        split_file=split_path,
    )


def _sample(row: SplitRow, image_dir: Path, spec: DatasetSpec, where: str) -> Sample:
    relpath = image_relpath(row.relpath, spec.image_subdir)
    folder = relpath.parts[0] if len(relpath.parts) > 1 else ""
    domain = next((known for known in spec.domains if known.lower() == folder.lower()), None)
    if domain is None:
        raise DataError(
            f"{where}: path {row.relpath!r} must start with a domain folder, one of "
            f"{', '.join(spec.domains)}"
        )
    return Sample(path=image_dir / relpath, label=row.label, classname=row.classname, domain=domain)


def _check_leave_one_domain_out(
    samples: dict[str, tuple[Sample, ...]], target: str, split_path: Path
) -> None:
    """Test images come from the target domain only and train/val from the others: a
    file that mixes them would silently turn the OOD-generalisation score in-domain."""
    for part, expect_target in (("train", False), ("val", False), ("test", True)):
        for sample in samples[part]:
            if (sample.domain == target) != expect_target:
                where = "only" if expect_target else "never"
                raise DataError(
                    f"split file {split_path}: {part} lists {sample.path} from domain "
                    f"{sample.domain}, but {part} should {where} hold target-domain "
                    f"({target}) images"
                )
