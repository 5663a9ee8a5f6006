"""Run the `test_*` functions of the named modules; works on MicroPython and CPython.

usage: run_tests.py MODULE...   (module names as imported, e.g. test_mpy_codec)

The modules must be importable: run with MICROPYPATH (MicroPython) or
PYTHONPATH (CPython) naming agent/ and tests/micropython/. Each test runs in
name order; a failure prints its traceback. The last line reads
"N passed, N failed", and the exit status is 1 when any test failed.
"""

import sys


def _print_error(error):
    if hasattr(sys, "print_exception"):
        sys.print_exception(error)
        return
    import traceback
    traceback.print_exception(type(error), error, error.__traceback__)


def run_module(name):
    """Run the tests of module `name`; return (passed, failed) counts."""
    module = __import__(name)
    passed = 0
    failed = 0
    for attribute in sorted(dir(module)):
        if not attribute.startswith("test_"):
            continue
        function = getattr(module, attribute)
        if not callable(function):
            continue
        try:
            function()
        except Exception as error:
            failed += 1
            print("FAIL %s.%s" % (name, attribute))
            _print_error(error)
            continue
        passed += 1
        print("PASS %s.%s" % (name, attribute))
    return passed, failed


def main(names):
    if not names:
        print("usage: run_tests.py MODULE...")
        return 2
    passed = 0
    failed = 0
    for name in names:
        module_passed, module_failed = run_module(name)
        passed += module_passed
        failed += module_failed
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
