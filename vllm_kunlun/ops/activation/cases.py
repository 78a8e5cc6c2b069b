"""check-kernels cases of the activation family."""

from vllm_kunlun.ops.check.case import Case, randn, wide_view


def _x(shape, strided: bool = False):
    def make(dtype, device, g):
        if strided:
            return (wide_view(shape[0], shape[1], dtype, device, g),)
        return (randn(shape, dtype, device, g),)

    return make


def _gelu(shape, approximate: str, strided: bool = False):
    def make(dtype, device, g):
        return (*_x(shape, strided)(dtype, device, g), approximate)

    return make


_SHAPES = [("1 token", (1, 128)), ("5 x 74 (odd half)", (5, 74)), ("3-D [2, 3, 256]", (2, 3, 256))]

CASES = {
    "silu_and_mul": [
        *(Case(name, _x(shape)) for name, shape in _SHAPES),
        Case("strided rows", _x((6, 256), strided=True)),
        Case("1024 x 11008", _x((1024, 11008)), big=True),
    ],
    "gelu_and_mul": [
        *(Case(f"{name}, erf", _gelu(shape, "none")) for name, shape in _SHAPES),
        Case("tanh", _gelu((9, 256), "tanh")),
        Case("strided rows, tanh", _gelu((6, 256), "tanh", strided=True)),
    ],
}
