"""Domain splits (`test_on_<domain>.json`): OoD-Bench's files where the dataset has them,
else the files `generated_splits` writes (DomainBed's folders, image folders, archives)."""

from __future__ import annotations

from pathlib import Path

from croft_search.data.base import DomainSplit, Sample
from croft_search.data.generated_splits import (
    generated_location,
    has_domain_folders,
    split_file_name,
)
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
from croft_search.errors import ConfigError, DataError


def load_domain_split(name: str, root: Path, target_domain: str) -> DomainSplit:
    """Train/val (source domains) and test (`target_domain`) of dataset `name` under the
    data root `root`, every listed image checked to exist."""
    spec = get_dataset_spec(name)
    require_kind(spec, "domain_split", "load_domain_split")
    target = spec.canonical_domain(target_domain)
    if target not in spec.target_domains:
        raise ConfigError(
            f"dataset {spec.name} trains on {', '.join(spec.train_domains)} and tests on "
            f"{', '.join(spec.target_domains)}, not {target}"
        )
    split_dir, image_dir = split_location(spec, dataset_dir(spec, root))
    split_path = split_dir / split_file_name(target)
    parts = read_split_file(split_path, required=SPLIT_PARTS)
    classnames = classnames_by_label(parts.values(), split_path, contiguous=True)
    samples = {
        part: tuple(
            _sample(row, image_dir, spec, f"{split_path}: {part} row {index}")
            for index, row in enumerate(parts[part])
        )
        for part in SPLIT_PARTS
    }
    sources = spec.source_domains(target)
    _check_domains(samples, target, sources, split_path)
    check_images_exist(
        (sample.path for part in samples.values() for sample in part), split_path, image_dir
    )
    return DomainSplit(
        dataset=spec.name,
        target_domain=target,
        source_domains=sources,
        classnames=classnames,
        train=samples["train"],
        val=samples["val"],
        test=samples["test"],
        split_file=split_path,
    )


def split_location(spec: DatasetSpec, folder: Path) -> tuple[Path, Path]:
    """(the folder of the dataset's split files, the folder their paths are relative to):
    OoD-Bench's split files win where the dataset has any; else its own writer's or, for
    domain folders, DomainBed's generated ones."""
    if any(folder.glob("test_on_*.json")) or not (
        spec.split_writer or has_domain_folders(spec, folder)
    ):
        return folder, folder / spec.image_subdir
    return generated_location(spec, folder)


def _sample(row: SplitRow, image_dir: Path, spec: DatasetSpec, where: str) -> Sample:
    relpath = image_relpath(row.relpath, spec.image_subdir)
    if len(spec.domains) == 1:  # no domain folders to read it from
        domain = spec.domains[0]
    else:
        domain = spec.domain_of_folder(relpath.parts[0] if len(relpath.parts) > 1 else "")
    if domain is None:
        raise DataError(
            f"{where}: path {row.relpath!r} must start with a domain folder, one of "
            f"{', '.join(spec.domains)}"
        )
    return Sample(path=image_dir / relpath, label=row.label, classname=row.classname, domain=domain)


def _check_domains(
    samples: dict[str, tuple[Sample, ...]],
    target: str,
    sources: tuple[str, ...],
    split_path: Path,
) -> None:
    """Test images come from the target domain only and train/val from the sources: a
    file that mixes them would silently turn the OOD-generalisation score in-domain."""
    for part, allowed in (("train", sources), ("val", sources), ("test", (target,))):
        for sample in samples[part]:
            if sample.domain in allowed:
                continue
            if part == "test" or sample.domain == target:
                where = "only" if part == "test" else "never"
                should = f"should {where} hold target-domain ({target}) images"
            else:
                should = f"should only hold images of {', '.join(sources)}"
            raise DataError(
                f"split file {split_path}: {part} lists {sample.path} from domain "
                f"{sample.domain}, but {part} {should}"
            )
