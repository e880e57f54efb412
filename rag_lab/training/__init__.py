"""Trainers: each takes questions and their retrieved passages (never the experiment config) and
leaves a model folder. The runner decides what to train and with which data.

    train_generator(examples, contexts, settings, generator_cfg, out, record)   # decoder reader, full or LoRA
    train_reader(examples, contexts, settings, model, out, record)              # extractive span reader
    train_dense_retriever(questions, bm25_contexts, retriever_training_cfg, out)  # DPR-style encoder
    train_joint(examples, passage_index, settings, generator_cfg, k, temperature, out, record)  # RAG end to end
    train_fid(examples, contexts, settings, generator_cfg, out, record)         # Fusion-in-Decoder reader
"""
from rag_lab.training.common import FINAL, Split, TrainSettings, TrainingError, finished, split_train_dev
from rag_lab.training.generator import train_generator
from rag_lab.training.fid import train_fid
from rag_lab.training.joint import (QUERY_ENCODER, PassageIndex, perplexity_distillation_loss, rag_sequence_loss, rag_token_loss,
                                    train_joint)
from rag_lab.training.reader import train_reader
from rag_lab.training.retriever import TrainPair, contrastive_loss, mine_training_pairs, train_dense_retriever

__all__ = ["FINAL", "QUERY_ENCODER", "PassageIndex", "perplexity_distillation_loss", "rag_sequence_loss", "rag_token_loss",
           "train_fid", "train_joint", "Split", "TrainSettings", "TrainingError", "TrainPair", "contrastive_loss", "finished",
           "mine_training_pairs", "split_train_dev", "train_dense_retriever", "train_generator", "train_reader"]
