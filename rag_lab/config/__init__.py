"""Typed experiment configuration: one dataclass per component, strict YAML loading.

An experiment YAML overrides only what changes; every field has a default and a help
string. Unknown or misspelt keys and wrong types are errors that name the key:

    name: rag_zero_shot_bm25
    regime: rag
    retriever: {kind: bm25, k: 5}
    profiles:
      smoke: {data: {n_eval: 20}}     # why: seconds, for CI and notebook tests

`sections.py`: the sections (data, retriever, generator, training) and `ConfigError`;
`experiment.py`: the regime table and the experiment / retrieval-study configs;
`loading.py`: YAML, bases, profiles, overrides, path resolution.
"""
from rag_lab.config.experiment import (ORACLE_RETRIEVERS, REGIMES, BudgetStudyConfig, ExperimentConfig, Regime,
                                       RetrievalStudyConfig, RetrieverTrainingConfig)
from rag_lab.config.loading import (PROFILES, beside_config, config_help, declared_profiles, experiments_in, from_dict,
                                    is_study, load_experiment, parse_override, resolve_paths)
from rag_lab.config.sections import (CT2_COMPUTE_TYPES, MAX_NAME, ConfigError, DataConfig, GeneratorConfig, RetrieverConfig,
                                     TrainingConfig, check_name, key_view)

__all__ = ["BudgetStudyConfig", "CT2_COMPUTE_TYPES", "ConfigError", "DataConfig", "ExperimentConfig", "GeneratorConfig",
           "MAX_NAME", "ORACLE_RETRIEVERS", "PROFILES", "REGIMES", "Regime", "RetrievalStudyConfig", "RetrieverConfig",
           "RetrieverTrainingConfig", "TrainingConfig", "beside_config", "check_name", "config_help", "declared_profiles",
           "experiments_in", "from_dict", "is_study", "key_view", "load_experiment", "parse_override", "resolve_paths"]
