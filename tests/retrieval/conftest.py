import pytest

SMALL_ZOO = [
    "torchvision/resnet18", "torchvision/resnet34", "torchvision/resnet50",
    "torchvision/quantized_resnet18", "torchvision/vit_b_16", "torchvision/vit_b_32",
    "torchvision/swin_t", "torchvision/swin_s", "torchvision/mobilenet_v2",
    "torchvision/mnasnet0_5", "torchvision/efficientnet_b0", "torchvision/efficientnet_b1",
]


@pytest.fixture(scope="session")
def small_records():
    """Graph records of a dozen torchvision models, read on meta (a few seconds)."""
    from fastarch.retrieval.build import extract_record

    return {n: extract_record(n, time_limit=60) for n in SMALL_ZOO}


@pytest.fixture(scope="session")
def small_index(small_records):
    from fastarch.retrieval.index import ArchitectureIndex

    return ArchitectureIndex.from_records(small_records, text=False)


@pytest.fixture(scope="session")
def small_text_index(small_records):
    from fastarch.retrieval.index import ArchitectureIndex

    return ArchitectureIndex.from_records(small_records, text=True)
