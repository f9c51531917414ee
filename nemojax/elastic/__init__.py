"""Nemotron Elastic and Star Elastic: many nested submodels in one checkpoint, as pure transforms on a Model.

    scores = nemojax.compress.importance(model, batches)
    ranking = elastic.layer_ranking(model, batches)                 # depth: layers in removal order
    em = elastic.elastify(model, scores, budgets=(1.0, 0.75, 0.5), removal_order=ranking.removal_order[:2])
    em, history = elastic.train(em, model, data, elastic.ElasticConfig(steps=200))
    em(tokens, budget=0.75); em.extract(0.5); elastic.save(em, "out/")
    elastic.generate(em, prompts, thinking_budget_model=0.75, answer_budget_model=1.0)   # Star Elastic decoding

`permute` orders every elastic axis by importance so that each nested submodel is a prefix; `forward` runs a
submodel under prefix masks (static shapes); `count` prices one (params, active params, memory); the routers pick
a submodel per budget (arXiv 2511.16664, 2605.07182).
"""

from nemojax.elastic.choices import Choices, default_choices, make_choices
from nemojax.elastic.count import count, count_exact
from nemojax.elastic.depth import LayerRanking, layer_ranking
from nemojax.elastic.extract import slice_sizes
from nemojax.elastic.generate import ElasticGeneration, MaskedView, generate
from nemojax.elastic.masked import collection, forward
from nemojax.elastic.model import ElasticModel, elastify, load, save
from nemojax.elastic.permute import permute
from nemojax.elastic.train import ElasticConfig, train

__all__ = ["Choices", "ElasticConfig", "ElasticGeneration", "ElasticModel", "LayerRanking", "MaskedView", "collection",
           "count", "count_exact", "default_choices", "elastify", "forward", "generate", "layer_ranking", "load",
           "make_choices", "permute", "save", "slice_sizes", "train"]
