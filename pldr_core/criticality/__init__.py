"""Criticality of a PLDR-LLM read from its deductive outputs: the order parameter OP(X) of A, A_LM,
A_P and G_LM (sampled continuations against the prompt alone), per-head diagnostics, the G-cache drift,
a cheap probe for pretraining and a loss-spike detector.

    from pldr_core.criticality import Protocol, measure_criticality
    result = measure_criticality(model, prompt_ids, Protocol(samples=100, new_tokens=256))
    result.order_parameter["G_LM"]
"""

from pldr_core.criticality.heads import commutant_mask, commutant_residual, numerical_rank, rope_pair_index
from pldr_core.criticality.measure import (
    CriticalityResult,
    ProbeResult,
    Protocol,
    Sample,
    criticality_probe,
    measure_criticality,
    sample_runs,
)
from pldr_core.criticality.order import KINDS, OrderAccumulator, Readout, pooled_op, readout, substitute_A
from pldr_core.criticality.report import (
    NEAR_CRITICAL_MAX,
    SUB_CRITICAL_MIN,
    collect_prompts,
    reading,
    write_json,
    write_plots,
)
from pldr_core.criticality.spikes import SpikeDetector, SpikeRecord

__all__ = [
    "KINDS", "NEAR_CRITICAL_MAX", "SUB_CRITICAL_MIN", "CriticalityResult", "OrderAccumulator", "ProbeResult",
    "Protocol", "Readout", "Sample", "SpikeDetector", "SpikeRecord", "collect_prompts", "commutant_mask",
    "commutant_residual", "criticality_probe", "measure_criticality", "numerical_rank", "pooled_op",
    "reading", "readout", "rope_pair_index", "sample_runs", "substitute_A", "write_json", "write_plots",
]
