"""Does the GPU quantize bf16 pairs to fp8 as the CPU does? And where they differ, which one rounds correctly?

`kvzip_cache.storage.quantize_fp8` divides each row by ``max|row| / 448`` in float32 and converts to float8 e4m3.
This compares both steps (the float32 quotient, then the conversion) between the CPU and CUDA on random rows of
each dtype and reports, for differing codes, how far each device's value is from the exact (float64) quotient.

    python scripts/fp8_rounding_check.py     # CUDA only
"""

import torch

from kvzip_cache.storage import FP8, FP8_MAX, quantize_fp8


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        rows = (torch.randn(200_000, 128, generator=generator) * 3).to(dtype)
        cpu_codes, cpu_scales = quantize_fp8(rows)
        gpu_codes, gpu_scales = (t.cpu() for t in quantize_fp8(rows.cuda()))
        wide = rows.float()
        cpu_quotient = wide / cpu_scales[:, None]
        gpu_quotient = (wide.cuda() / gpu_scales.cuda()[:, None]).cpu()
        converted_on_gpu = cpu_quotient.cuda().to(FP8).cpu()  # the same quotient, converted by each device
        differ = cpu_codes.view(torch.uint8) != gpu_codes.view(torch.uint8)
        exact = wide.double() / cpu_scales.double()[:, None]
        cpu_error = (cpu_codes.double() - exact).abs()[differ]
        gpu_error = (gpu_codes.double() - exact).abs()[differ]
        print(f"{dtype}: scales equal {torch.equal(cpu_scales, gpu_scales)}; quotients equal "
              f"{torch.equal(cpu_quotient, gpu_quotient)}; conversion of the same quotient equal "
              f"{torch.equal(converted_on_gpu.view(torch.uint8), cpu_codes.view(torch.uint8))}; codes differ in "
              f"{int(differ.sum())} of {differ.numel()}; code distance max "
              f"{int((cpu_codes.view(torch.uint8).int() - gpu_codes.view(torch.uint8).int()).abs().max())}; "
              f"CPU nearer the exact quotient in {int((cpu_error < gpu_error).sum())}, GPU in "
              f"{int((gpu_error < cpu_error).sum())}, ties {int((gpu_error == cpu_error).sum())}")
        if differ.any():
            index = differ.nonzero()[:5]
            for r, c in index.tolist():
                print(f"  row {r} col {c}: x={wide[r, c].item()!r} scale={cpu_scales[r].item()!r} "
                      f"quotient cpu={cpu_quotient[r, c].item()!r} gpu={gpu_quotient[r, c].item()!r} "
                      f"exact={exact[r, c].item()!r} code cpu={cpu_codes[r, c].float().item()} "
                      f"gpu={gpu_codes[r, c].float().item()} (max {FP8_MAX})")


if __name__ == "__main__":
    main()
