"""eplb inside the serving engines, without forking them.

* :mod:`eplb.integrations.vllm` -- a vLLM (>= 0.33) EPLB policy backed by eplb, installed by the
  ``vllm.general_plugins`` entry point when ``EPLB_VLLM_POLICY=eplb`` is set.
* :mod:`eplb.integrations.sglang` -- SGLang's ``rebalance_experts`` call shape, ``--init-expert-location``
  files, and :func:`~eplb.integrations.sglang.pull` (``eplb pull --sglang URL``): expert statistics
  from a running server.
* :mod:`eplb.integrations.trtllm` -- TensorRT-LLM ``EXPERT_STATISTIC_PATH`` / ``extra_llm_api_options`` helpers.

The submodules are imported on demand (importing :mod:`eplb.integrations.vllm` looks for vLLM).
Step-by-step guides: ``docs/engines/{vllm,sglang,trtllm,vllm-ascend}.md``.
"""
