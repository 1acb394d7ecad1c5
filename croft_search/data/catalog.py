"""The datasets croft-search knows out of the box."""

from __future__ import annotations

from croft_search.data import digits_layout as layout
from croft_search.data import imagenet_setup1 as setup1
from croft_search.data.archives import CIFAR10, CIFAR100, cifar_split_writer
from croft_search.data.digits import build_digits
from croft_search.data.generated_splits import image_folder_splits
from croft_search.data.registry import DatasetSpec, register_dataset

_OOD_BENCH = "download it as described in https://github.com/m-Just/OoD-Bench/tree/main/data"
_COOP = "download it as described in https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
_EMBEDDED = "it should have been built automatically; call croft_search.data.build_digits"
_DOMAINBED = (
    "download it with DomainBed (python -m domainbed.scripts.download, "
    "https://github.com/facebookresearch/DomainBed)"
)
_CIFAR = "unpack the python version from https://www.cs.toronto.edu/~kriz/cifar.html"
_OOD_SETS = (
    "download it as the PLP and MOS papers list (https://github.com/deeplearning-wisc/"
    "large_scale_ood, NINCO: https://github.com/j-cb/NINCO) as <folder>/<class>/<image>"
)


def _embedded_digits_open_set(folder: str) -> DatasetSpec:
    """One of the digits benchmark's open sets: an image folder, built with the rest."""
    return DatasetSpec(
        name=folder,
        kind="open_set",
        folder=folder,
        domains=layout.DOMAINS,
        domain_in_filename=True,
        image_subdir="",
        hflip=False,
        builder=build_digits,
        download_hint=_EMBEDDED,
    )


# Open-set pairing for PACS/VLCS: Food101 for validation OOD, DTD for test OOD. The paper
# also tests on Food101 and Caltech101 (the trial setting test_open_sets); Caltech101 drops
# the classes the reference removes for overlapping the ID classes (CoOp/datasets/
# PACS_Caltech101.py, VLCS_Caltech101.py keep a class list; airplane, leopard and motorbike
# are lost there only because the list spells them as in the raw folders, and are dropped
# here too, so the open set is the reference's).
_CALTECH_LOST_BY_SPELLING = ("airplane", "leopard", "motorbike")
_CALTECH_EXCLUDED = (
    ("PACS", ("elephant", "electric_guitar", "dalmatian", "snoopy", "face",
              *_CALTECH_LOST_BY_SPELLING)),
    ("VLCS", ("car_side", "chair", "windsor_chair", "wheelchair", "dalmatian", "snoopy", "emu",
              "flamingo", "flamingo_head", "ibis", "pigeon", "face", "wild_cat",
              *_CALTECH_LOST_BY_SPELLING)),
)  # fmt: skip
for _spec in (
    DatasetSpec(
        name="PACS",
        kind="domain_split",
        folder="PACS",
        domains=("art_painting", "cartoon", "photo", "sketch"),
        val_open_sets=("Food101",),
        test_open_sets=("DTD",),
        download_hint=_OOD_BENCH,
    ),
    DatasetSpec(
        name="VLCS",
        kind="domain_split",
        folder="VLCS",
        domains=("CALTECH", "LABELME", "PASCAL", "SUN"),
        domain_folders=("Caltech101", "LabelMe", "VOC2007", "SUN09"),
        val_open_sets=("Food101",),
        test_open_sets=("DTD",),
        download_hint=_OOD_BENCH,
    ),
    DatasetSpec(
        name="digits",
        kind="domain_split",
        folder=layout.FOLDER,
        domains=layout.DOMAINS,
        val_open_sets=(layout.OPEN_VAL_FOLDER,),
        test_open_sets=(layout.OPEN_TEST_FOLDER,),
        hflip=False,
        prompt_template="a photo of the number {}.",
        builder=build_digits,
        download_hint=_EMBEDDED,
    ),
    # DomainBed's datasets in DomainBed's folders (PACS and VLCS above read DomainBed's
    # folders too where OoD-Bench's split files are missing); its default open sets.
    DatasetSpec(
        name="OfficeHome",
        kind="domain_split",
        folder="office_home",
        domains=("Art", "Clipart", "Product", "Real World"),
        val_open_sets=("Food101",),
        test_open_sets=("DTD",),
        download_hint=_DOMAINBED,
    ),
    DatasetSpec(
        name="TerraIncognita",
        kind="domain_split",
        folder="terra_incognita",
        domains=("location_100", "location_38", "location_43", "location_46"),
        val_open_sets=("Food101",),
        test_open_sets=("DTD",),
        download_hint=_DOMAINBED,
    ),
    DatasetSpec(
        name="DomainNet",
        kind="domain_split",
        folder="domain_net",
        domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
        val_open_sets=("Food101",),
        test_open_sets=("DTD",),
        download_hint=_DOMAINBED,
    ),
    # PLP's benchmarks: no covariate shift (one domain, its own test images), OOD sets as
    # image folders. CIFAR-10 and CIFAR-100 are each other's open sets (validation: the
    # other's held-out training images; test: its test images).
    DatasetSpec(
        name="CIFAR10",
        kind="domain_split",
        folder="cifar-10-batches-py",
        domains=("CIFAR10",),
        train_domains=("CIFAR10",),
        val_open_sets=("CIFAR100",),
        test_open_sets=("CIFAR100",),
        split_writer=cifar_split_writer(CIFAR10),
        download_hint=_CIFAR,
    ),
    DatasetSpec(
        name="CIFAR100",
        kind="domain_split",
        folder="cifar-100-python",
        domains=("CIFAR100",),
        train_domains=("CIFAR100",),
        val_open_sets=("CIFAR10",),
        test_open_sets=("CIFAR10",),
        split_writer=cifar_split_writer(CIFAR100),
        download_hint=_CIFAR,
    ),
    # ImageNet-1k as CoOp keeps it (imagenet/images/{train,val}/<wnid>/, classnames.txt):
    # the official val images are the test set, validation is held out of train. Food101
    # validates OOD detection (its classes that ImageNet also names are dropped).
    DatasetSpec(
        name="IN1K",
        kind="domain_split",
        folder="imagenet",
        domains=("IN1K",),
        train_domains=("IN1K",),
        part_folders=("train", "", "val"),
        val_open_sets=("Food101",),
        test_open_sets=("iNaturalist", "SUN", "Places", "Textures", "NINCO", "ImageNet-O"),
        split_writer=image_folder_splits,
        holdout_fraction=0.02,
        download_hint=_COOP,
    ),
    # Setup I of the CRoFT paper (croft_search/data/imagenet_setup1.py): trained on ImageNet's
    # ID classes, tested on ImageNet-V2, -Sketch, -A and -R, ImageNet's other classes OOD.
    DatasetSpec(
        name="ImageNet46",
        kind="domain_split",
        folder="imagenet",
        domains=setup1.DOMAINS,
        domain_folders=(
            "imagenet",
            "imagenetv2",
            "imagenet-sketch",
            "imagenet-adversarial",
            "imagenet-rendition",
        ),  # fmt: skip
        train_domains=(setup1.SOURCE,),
        val_open_sets=("ImageNet46-OOD",),
        test_open_sets=("ImageNet46-OOD",),
        split_writer=setup1.setup1_splits,
        split_seed=1,
        download_hint=_COOP,
    ),
    DatasetSpec(
        name="ImageNet46-OOD",
        kind="open_set",
        folder="imagenet",
        split_file=setup1.OPEN_SET_FILE,
        image_subdir="",
        split_writer=setup1.setup1_open_set,
        split_seed=1,
        download_hint=_COOP,
    ),
    *(
        DatasetSpec(name=name, kind="open_set", folder=folder, download_hint=_OOD_SETS)
        for name, folder in (
            ("iNaturalist", "iNaturalist"),
            ("SUN", "SUN"),
            ("Places", "Places"),
            ("Textures", "dtd/images"),
            ("NINCO", "NINCO/NINCO_OOD_classes"),
            ("ImageNet-O", "imagenet-o"),
        )
    ),
    DatasetSpec(
        name="DTD",
        kind="open_set",
        folder="dtd",
        split_file="split_zhou_DescribableTextures.json",
        download_hint=_COOP,
    ),
    DatasetSpec(
        name="Food101",
        kind="open_set",
        folder="food-101",
        split_file="split_zhou_Food101.json",
        download_hint=_COOP,
    ),
    DatasetSpec(
        name="Caltech101",
        kind="open_set",
        folder="caltech-101",
        image_subdir="101_ObjectCategories",
        split_file="split_zhou_Caltech101.json",
        excluded_classes=_CALTECH_EXCLUDED,
        download_hint=_COOP,
    ),
    _embedded_digits_open_set(layout.OPEN_VAL_FOLDER),
    _embedded_digits_open_set(layout.OPEN_TEST_FOLDER),
):
    register_dataset(_spec)
