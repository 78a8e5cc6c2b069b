"""check-kernels cases of the norm family: one row, odd widths, many rows, strided input."""

from vllm_kunlun.ops.check.case import Case, randn, wide_view

EPS = 1e-6


def _norm(fused: bool):
    """Cases' argument builders: (x, weight, eps), or (x, residual, weight, eps) when fused."""

    def shaped(rows: int, hidden: int, strided: bool = False):
        def make(dtype, device, g):
            if strided:
                x = wide_view(rows, hidden, dtype, device, g)
            else:
                x = randn((rows, hidden), dtype, device, g)
            residual = (randn((rows, hidden), dtype, device, g),) if fused else ()
            return x, *residual, randn((hidden,), dtype, device, g, 0.5) + 1, EPS

        return make

    return shaped


def _cases(make) -> list[Case]:
    return [
        Case("1 token", make(1, 64)),
        Case("7 x 100 (odd width)", make(7, 100)),
        Case("33 x 576", make(33, 576)),
        Case("strided rows", make(9, 128, strided=True)),
        Case("2048 x 4096", make(2048, 4096), big=True),
    ]


CASES = {
    "rms_norm": _cases(_norm(fused=False)),
    "fused_add_rms_norm": _cases(_norm(fused=True)),
    "gemma_rms_norm": _cases(_norm(fused=False)),
    "gemma_fused_add_rms_norm": _cases(_norm(fused=True)),
}
