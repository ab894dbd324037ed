"""transformers' own common model tests (`ModelTesterMixin` of its `tests/test_modeling_common.py`) on tiny MoR
models: the reference for "behaves like a transformers model".

transformers' wheels do not ship its tests; its source distribution ships `tests/test_modeling_common.py` (but not
`tests/generation/test_utils.py`, `tests/causal_lm_tester.py` or `tests/exporters/`, which that file imports). Point
`TRANSFORMERS_SOURCE` at the unpacked source distribution of the installed version:

    pip download --no-deps --no-binary :all: transformers==5.24.0 -d /tmp/tf_sdist
    tar xzf /tmp/tf_sdist/transformers-5.24.0.tar.gz -C /tmp/tf_sdist
    TRANSFORMERS_SOURCE=/tmp/tf_sdist/transformers-5.24.0 python -m pytest -q tests/test_transformers_common.py

It also needs `parameterized` (transformers' test dependency). Without `TRANSFORMERS_SOURCE` the module is skipped;
with it, a folder that is not the installed version's distribution, or a missing `parameterized`, is an error.
The two mixins the file imports but the distribution lacks are empty stand-ins (no export or generation tests run
from here; MoR's generation is tested against Llama and the uncached forward in test_generation.py).

Tests that cannot apply to MoR are skipped below with the reason (`INAPPLICABLE`); docs/usage.md, "transformers'
common model tests", lists them.
"""

import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import transformers

from conftest import missing_setup


def _load_model_tester_mixin(source: str):
    """transformers' `test_modeling_common` module from the source distribution in `source`, or what is wrong."""
    tests = Path(source) / "tests"
    if not (tests / "test_modeling_common.py").is_file():
        return None, f"TRANSFORMERS_SOURCE={source} holds no tests/test_modeling_common.py"
    version = next(
        (line.split(":", 1)[1].strip() for line in (Path(source) / "PKG-INFO").read_text().splitlines()
         if line.startswith("Version:")),
        None,
    ) if (Path(source) / "PKG-INFO").is_file() else None
    if version != transformers.__version__:
        return None, f"TRANSFORMERS_SOURCE is transformers {version}, the installed one is {transformers.__version__}"
    if importlib.util.find_spec("parameterized") is None:
        return None, "transformers' common tests need the `parameterized` package"
    # The file's relative imports of modules the distribution lacks resolve to empty stand-ins.
    package = types.ModuleType("transformers_common_tests")
    package.__path__ = [str(tests)]
    sys.modules[package.__name__] = package
    for folder, module_name, mixin in (("exporters", "test_export", "ExportTesterMixin"),
                                       ("generation", "test_utils", "GenerationTesterMixin")):
        subpackage = types.ModuleType(f"{package.__name__}.{folder}")
        subpackage.__path__ = []
        stand_in = types.ModuleType(f"{subpackage.__name__}.{module_name}")
        setattr(stand_in, mixin, type(mixin, (), {}))
        sys.modules[subpackage.__name__] = subpackage
        sys.modules[stand_in.__name__] = stand_in
    spec = importlib.util.spec_from_file_location(
        f"{package.__name__}.test_modeling_common", tests / "test_modeling_common.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, None


if not os.environ.get("TRANSFORMERS_SOURCE"):
    missing_setup("TRANSFORMERS_SOURCE is not set (the unpacked transformers source distribution; see the docstring)")
common, problem = _load_model_tester_mixin(os.environ["TRANSFORMERS_SOURCE"])
if common is None:
    pytest.fail(problem, pytrace=False)

from transformers.models.auto import modeling_auto  # noqa: E402

from modeling_mor import (  # noqa: E402
    MoRConfig,
    MoRForCausalLM,
    MoRForQuestionAnswering,
    MoRForSequenceClassification,
    MoRForTokenClassification,
    MoRModel,
)


class MoRModelTester:
    """Tiny MoR configs and inputs in the form transformers' model testers give them (random padding included)."""

    def __init__(self, parent, **config_fields):
        self.parent = parent
        self.batch_size = 3
        self.seq_length = 7
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.intermediate_size = 37
        self.config_fields = config_fields
        self.num_hidden_layers = config_fields["num_hidden_layers"]

    def get_config(self) -> MoRConfig:
        return MoRConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=64,
            pad_token_id=0,
            num_labels=3,
            **self.config_fields,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = common.random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


# The common tests decide what a class is for (which labels it takes, whether it is a base model) from transformers'
# auto mappings of in-tree models; MoR's classes go where an in-tree model's would, for the test's duration only.
TASK_MAPPINGS = {
    "MODEL_MAPPING_NAMES": MoRModel,
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": MoRForCausalLM,
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": MoRForSequenceClassification,
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": MoRForTokenClassification,
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": MoRForQuestionAnswering,
}

# Tests that cannot apply, with the reason: for every MoR model, or (second dict) for one sharing strategy.
NOT_IN_THE_DISTRIBUTION = {
    "test_generation_tester_mixin_inheritance": "GenerationTesterMixin (tests/generation/test_utils.py) is not in "
    "transformers' source distribution; MoR's generate() is tested against Llama in test_generation.py",
}
INAPPLICABLE_FOR_STRATEGY = {
    "middle_cycle": {
        "test_num_layers_is_small": "middle_cycle has an unshared first and last layer around a shared block that "
        "recurses at least twice: at least 4 layers, where the test allows 2",
    },
    "cycle": {
        "test_retain_grad_hidden_states_attentions": "the first layer of a cycle model is a recursion step, which "
        "attends over its packed tokens; the [batch, heads, queries, keys] weights it returns are assembled from "
        "those for the output (zero for tokens that did not take the step), so nothing downstream depends on them "
        "and they get no gradient (middle_cycle's first layer is unshared and passes)",
        **dict.fromkeys(
            ["test_training_gradient_checkpointing", "test_training_gradient_checkpointing_use_reentrant_false",
             "test_training_gradient_checkpointing_use_reentrant_true"],
            "the test wraps the first checkpointed layer's forward in one mock that keeps only the latest call's "
            "arguments; a cycle model's first layer is shared and runs once per recursion step, so the backward's "
            "recompute of its first call replays the last call's arguments on the first call's tokens "
            "(middle_cycle's first layer is unshared and passes; test_training.py checks both checkpointing modes "
            "against the plain backward for every strategy)",
        ),
    },
}


class MoRCommonTests(common.ModelTesterMixin):
    all_model_classes = (
        MoRModel,
        MoRForCausalLM,
        MoRForSequenceClassification,
        MoRForTokenClassification,
        MoRForQuestionAnswering,
    )
    config_fields: dict = {}

    def setUp(self):
        reason = NOT_IN_THE_DISTRIBUTION.get(self._testMethodName) or INAPPLICABLE_FOR_STRATEGY[
            self.config_fields["sharing_strategy"]
        ].get(self._testMethodName)
        if reason is not None:
            self.skipTest(reason)
        for mapping, model_class in TASK_MAPPINGS.items():
            patch = mock.patch.dict(getattr(modeling_auto, mapping), {"mor": model_class.__name__})
            patch.start()
            self.addCleanup(patch.stop)
        self.model_tester = MoRModelTester(self, **self.config_fields)


class MoRExpertChoiceMiddleCycleTest(MoRCommonTests, unittest.TestCase):
    config_fields = dict(num_hidden_layers=4, num_recursions=2, sharing_strategy="middle_cycle", routing="expert_choice")


class MoRTokenChoiceCycleTest(MoRCommonTests, unittest.TestCase):
    config_fields = dict(num_hidden_layers=2, num_recursions=2, sharing_strategy="cycle", routing="token_choice")


del MoRCommonTests  # collected through its subclasses only
