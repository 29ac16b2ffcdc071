"""The CLIP image-embedding pipeline as the stage notebooks call it: `import lib`, then `lib.<name>`.

The notebooks' names, stage by stage, in the order each notebook calls them:

    every stage   read_parameters, collection        the stage's parameters; the collection in OUTPUT_DIR
    00_setup      SetupParams, describe_environment
    01_metadata   MetadataParams, build_image_table, save_image_table
                                                     -> OUTPUT_DIR/image_table.parquet
    02_embed      EmbedParams, load_image_table, run_encoder, with_machine_sizes, describe_sizes,
                  plan_run, embed_chunks, find_chunks
                                                     -> OUTPUT_DIR/chunks/chunk_<start>_<end>.h5
    03_merge      MergeParams, merge_chunks          -> OUTPUT_DIR/Images_Embedded.h5
    04_search     SearchParams, open_embeddings, Fetcher, query_encoder, describe_query_model,
                  search, result_table, query_label, image_query_vector, gallery_html,
                  export_embeddings, launch_app      -> top-k tables, galleries, exports, the app
    your own code load_encoder (a CLIP model: encode, encode_text), configure (timeouts, the
                  repository root), prepare_process, PipelineError, ParameterError, ImageFailure

Everything else is reached through its module (`lib.embed.ImageLoader`, `lib.claims.FileLock`). One
module per seam, in the order the data flows through them; each imports only modules above it:

    errors       PipelineError (what the user can fix) and ImageFailure (one image, with its reason)
    settings     the repository root, timeouts, block sizes; prepare_process, the one process-wide call
    workspace    the repository root's .cache/, collections (OUTPUT_DIR), atomic files, free space
    storage      collections on object storage (OUTPUT_DIR=s3://...): staged copies, uploads, a lease
    params       each stage's parameters, read from the notebook and checked
    progress     tqdm bars where someone watches, printed lines when headless
    downloads    HTTP sessions and retries; whole files fetched once into .cache/downloads/
    fetch        an image's bytes (or a byte range's) from S3, HTTP(S), fsspec or disk; 01's shards whole
    shards       01: WebDataset tar shards, each indexed once -> a row per sample, its image's byte range
    sources      01: metadata (Open Images, a listing, a folder, shards) -> the image table's rows
    table        the image table file that 01 writes and 02, 03 and 04 read
    preprocess   02: bytes -> decoded, oriented, OpenAI-preprocessed pixels
    device_jpeg  02: PREPROCESS='fast' on CUDA: JPEGs decoded and preprocessed on the GPU, by batch
    openai_weights     02: the tensors of OpenAI .pt files, read as data only
    openai_checkpoint  02: OpenAI weights -> transformers CLIP folders in .cache/models/
    onnx_tower   02: the image tower exported to ONNX (and int8) in .cache/onnx/, run by ONNX Runtime
    onednn       02: fp32 on the CPU: the model's Linear layers through oneDNN's matrix product
    model        02: CLIP checkpoints, devices, precision; pixels -> normalised embeddings
    cluster      02: EXECUTOR='ray': the Ray instance or cluster, and the workers it has room for
    chunkfile    the chunk file format: records, attributes, signature, read and write
    claims       locks: one writer per chunk and per merged file, across processes
    plan         02: the run's encoder and sizes, and the chunks left to embed
    embed        02: one chunk's rows through fetch -> preprocess -> encode, in threads
    executor     02: a run on this machine: claim, embed and write each chunk; the summary
    ray_worker   02: EXECUTOR='ray', a worker: the model loaded once, then whole chunks as locally
    ray_executor  02: EXECUTOR='ray', the driver: chunks to workers, their progress, lost ones again
    merge        03: chunk files -> one verified merged file
    nearest      04: the merged file, exact and IVF top-k, query vectors
    display      04: galleries of thumbnails
    export       04: .npy, Parquet and clip-retrieval exports, optionally through PCA, in float16
    vector_index  04: the app's vectors held in memory (float32, or float16), else the IVF index
    subset       04: the app's results (near-duplicates hidden), and the shown images as a ZIP
    app          04: the search app in the browser (Gradio), from 04 or `make app`
    environment  00: versions, device and free disk
"""

from . import (
    app,
    chunkfile,
    claims,
    cluster,
    device_jpeg,
    display,
    downloads,
    embed,
    environment,
    errors,
    executor,
    export,
    fetch,
    merge,
    model,
    nearest,
    onednn,
    onnx_tower,
    openai_checkpoint,
    openai_weights,
    params,
    plan,
    preprocess,
    progress,
    ray_executor,
    ray_worker,
    settings,
    shards,
    sources,
    storage,
    subset,
    table,
    vector_index,
    workspace,
)
from .app import launch_app
from .chunkfile import find_chunks
from .display import gallery_html
from .environment import describe_environment
from .errors import ImageFailure, ParameterError, PipelineError
from .export import export_embeddings
from .fetch import Fetcher
from .merge import merge_chunks
from .model import load_encoder
from .nearest import (
    describe_query_model,
    image_query_vector,
    open_embeddings,
    query_encoder,
    query_label,
    result_table,
    search,
)
from .params import EmbedParams, MergeParams, MetadataParams, SearchParams, SetupParams, read_parameters
from .plan import describe_sizes, plan_run, run_encoder, with_machine_sizes
from .ray_executor import embed_chunks
from .settings import configure, prepare_process
from .sources import build_image_table
from .table import load_image_table, save_image_table
from .workspace import collection

__all__ = [
    "EmbedParams",
    "Fetcher",
    "ImageFailure",
    "MergeParams",
    "MetadataParams",
    "ParameterError",
    "PipelineError",
    "SearchParams",
    "SetupParams",
    "app",
    "build_image_table",
    "chunkfile",
    "claims",
    "cluster",
    "collection",
    "configure",
    "describe_environment",
    "describe_query_model",
    "describe_sizes",
    "device_jpeg",
    "display",
    "downloads",
    "embed",
    "embed_chunks",
    "environment",
    "errors",
    "executor",
    "export",
    "export_embeddings",
    "fetch",
    "find_chunks",
    "gallery_html",
    "image_query_vector",
    "launch_app",
    "load_encoder",
    "load_image_table",
    "merge",
    "merge_chunks",
    "model",
    "nearest",
    "onednn",
    "onnx_tower",
    "openai_checkpoint",
    "openai_weights",
    "open_embeddings",
    "params",
    "plan",
    "plan_run",
    "prepare_process",
    "preprocess",
    "progress",
    "query_encoder",
    "query_label",
    "ray_executor",
    "ray_worker",
    "read_parameters",
    "result_table",
    "run_encoder",
    "save_image_table",
    "search",
    "settings",
    "shards",
    "sources",
    "storage",
    "subset",
    "table",
    "vector_index",
    "with_machine_sizes",
    "workspace",
]
