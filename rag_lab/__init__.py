"""rag_lab: retriever, generator and trainer primitives; the numbered notebooks compose them."""
import warnings

# why: the notebooks run without ipywidgets, so tqdm.auto draws text bars and says so (TqdmWarning) in every
# kernel; text bars are what we want there (papermill runs also set TQDM_DISABLE: no bars in committed notebooks)
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
