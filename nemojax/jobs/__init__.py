"""The `nemojax` command's jobs: a config file and a workdir in, checkpoints, records and figures out; each resumes
from its workdir.

    jobs.demo       `nemojax demo`: train, then the compression and quantization stages
    jobs.minitron   `nemojax prune` / `nemojax distill`
    jobs.quantize   `nemojax quantize` / `nemojax qad`
    jobs.common     the batches a job config names, the validation loss, the records
"""
