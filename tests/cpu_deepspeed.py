"""Lightning's `DeepSpeedStrategy` on CPU, for tests: the strategy accepts CUDA devices only, while
DeepSpeed itself runs ZeRO-2/3 on its CPU accelerator over gloo. Only those checks are lifted."""

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips the CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()  # as DeepSpeedStrategy does, less its CUDA device-index check
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # DeepSpeed reads the device index as the rank's device
