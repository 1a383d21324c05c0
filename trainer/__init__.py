from artifacts.logs import quiet_optional_kernels

quiet_optional_kernels()
