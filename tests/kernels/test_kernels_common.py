"""Pure helpers of adaptive_kernels.kernels._common."""

from adaptive_kernels.kernels._common import interpreter_numpy_problem


def test_interpreter_numpy_problem_names_the_versions_and_the_fix():
    # triton 3.6.0 + numpy 2.4.6: seen failing in the interpreter ("only 0-dimensional arrays ...")
    why = interpreter_numpy_problem("3.6.0", "2.4.6")
    assert why is not None and "3.6.0" in why and "2.4.6" in why and "numpy<2.4" in why
    assert interpreter_numpy_problem("3.6.0", "2.3.5") is None  # the same suite passed with numpy 2.3.5
    assert interpreter_numpy_problem("3.8.0", "2.4.6") is None  # 3.8 squeezes the array first
    assert interpreter_numpy_problem("3.9.0+git1234", "2.5.0rc1") is None
