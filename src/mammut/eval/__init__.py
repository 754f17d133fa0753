"""Evaluation: a run folder scored with its training task's own evaluation (``mammut eval RUN``,
:mod:`mammut.eval.evaluate`, reports by :mod:`mammut.eval.report`), and the benchmarks of
``mammut eval BENCHMARK SOURCE ...`` (:mod:`mammut.eval.benchmarks`: one registered object per
benchmark; their evaluation code in :mod:`~mammut.eval.zeroshot`, :mod:`~mammut.eval.retrieval`,
:mod:`~mammut.eval.captioning` and :mod:`~mammut.eval.vqa`)."""
