"""Trainers: each takes questions and their retrieved passages (never the experiment config) and
leaves a model folder. The runner decides what to train and with which data.

    train_generator(examples, contexts, settings, generator_cfg, out, record)   # decoder reader, full or LoRA
    train_reader(examples, contexts, settings, model, out, record)              # extractive span reader
    train_dense_retriever(questions, bm25_contexts, retriever_training_cfg, out)  # DPR-style encoder
"""
from rag_lab.training.generator import FINAL, Split, TrainSettings, TrainingError, finished, split_train_dev, train_generator
from rag_lab.training.reader import train_reader
from rag_lab.training.retriever import TrainPair, contrastive_loss, mine_training_pairs, train_dense_retriever

__all__ = ["FINAL", "Split", "TrainSettings", "TrainingError", "TrainPair", "contrastive_loss", "finished",
           "mine_training_pairs", "split_train_dev", "train_dense_retriever", "train_generator", "train_reader"]
