"""Training primitives: fine-tuning components of the RAG pipeline on our own data."""
from rag_lab.training.retriever import TrainPair, contrastive_loss, mine_training_pairs, train_dense_retriever
