# cmake/cuda.cmake — the CUDA data plane: tensorreg::cuda (the CUDA device memory provider and
# the GPU tree hash) and, when enabled, its tests and benchmarks.
#
# Included from the top-level CMakeLists.txt when TENSORREG_HAVE_CUDA is ON, after
# enable_language(CUDA) + find_package(CUDAToolkit), add_subdirectory(src) (tensorreg,
# tensorreg_warnings) and the tests block (enable_testing()):
#
#   if(TENSORREG_HAVE_CUDA)
#     include(cmake/cuda.cmake)
#   endif()
#
# Every binary links the CUDA runtime statically (CUDA::cudart_static), so it needs only the
# driver (libcuda.so) on the GPU machine.

set(TENSORREG_CUDA_ARCHITECTURES "80-real;90" CACHE STRING
    "CUDA architectures of the kernels (CMake CUDA_ARCHITECTURES syntax): sm_80 code, sm_90 code + PTX")
option(TENSORREG_CUDA_PTXAS_VERBOSE "Print ptxas register/spill reports (-Xptxas=-v) for the kernels" OFF)

# Options for .cu files: host-compiler warnings without -Werror (nvcc-generated host code trips
# some of them), optimisation of device code, and line info for profilers.
add_library(tensorreg_cuda_flags INTERFACE)
target_compile_options(tensorreg_cuda_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra -lineinfo>
  $<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<BOOL:${TENSORREG_CUDA_PTXAS_VERBOSE}>>:-Xptxas=-v>)

# C++20 for .cu files. CMake 3.25 knows nvcc's dialect flags only up to C++17, and when the C++
# compiler is clang it puts nvcc's default (-std=c++14) after a target's own options, where
# nvcc takes the last -std: so it is taught the C++20 flag and asked for it as a standard.
set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
# The C++ files of these targets get C++20 as well: clang 14 defaults to C++14.
function(tensorreg_cuda_target target)
  target_compile_features(${target} PRIVATE cxx_std_20)
  set_target_properties(${target} PROPERTIES
    CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON CUDA_EXTENSIONS OFF
    CUDA_ARCHITECTURES "${TENSORREG_CUDA_ARCHITECTURES}"
    CUDA_RUNTIME_LIBRARY Static)
endfunction()

# --- the library -------------------------------------------------------------------------
file(GLOB tensorreg_cuda_sources CONFIGURE_DEPENDS
  ${PROJECT_SOURCE_DIR}/src/cuda/*.cpp ${PROJECT_SOURCE_DIR}/src/cuda/*.cu)
add_library(tensorreg_cuda STATIC ${tensorreg_cuda_sources})
add_library(tensorreg::cuda ALIAS tensorreg_cuda)
tensorreg_cuda_target(tensorreg_cuda)
# Installed and exported with tensorreg (the install block of the top-level CMakeLists.txt) as
# tensorreg::cuda, the name the build tree gives it too.
set_target_properties(tensorreg_cuda PROPERTIES POSITION_INDEPENDENT_CODE ON EXPORT_NAME cuda)
target_compile_features(tensorreg_cuda PUBLIC cxx_std_20)
target_include_directories(tensorreg_cuda
  PUBLIC $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include> $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>
  PRIVATE ${PROJECT_SOURCE_DIR}/src)
target_link_libraries(tensorreg_cuda
  PUBLIC tensorreg::tensorreg CUDA::cudart_static
  PRIVATE $<BUILD_INTERFACE:tensorreg_warnings> $<BUILD_INTERFACE:tensorreg_cuda_flags>)

# Test data written on the GPU (shared by the GPU tests and the benchmark).
if(TENSORREG_BUILD_TESTS OR TENSORREG_BUILD_BENCHMARKS)
  add_library(tensorreg_gpu_fill STATIC ${PROJECT_SOURCE_DIR}/tests/cuda/gpu_fill.cu)
  tensorreg_cuda_target(tensorreg_gpu_fill)
  target_include_directories(tensorreg_gpu_fill PUBLIC ${PROJECT_SOURCE_DIR}/tests/cuda)
  target_link_libraries(tensorreg_gpu_fill PUBLIC CUDA::cudart_static PRIVATE tensorreg_cuda_flags)
endif()

# --- tests -------------------------------------------------------------------------------
if(TENSORREG_BUILD_TESTS)
  find_package(Catch2 2.13 REQUIRED)

  # The kernels' SHA-256 logic compiled as host code, against OpenSSL, and the batched copy's
  # plan and per-chunk code run on host memory: runs without a GPU.
  add_executable(tensorreg_gpu_host_tests ${PROJECT_SOURCE_DIR}/tests/cuda/sha256_device_host_tests.cu
                                          ${PROJECT_SOURCE_DIR}/tests/cuda/batched_copy_host_tests.cu)
  tensorreg_cuda_target(tensorreg_gpu_host_tests)
  target_include_directories(tensorreg_gpu_host_tests PRIVATE ${PROJECT_SOURCE_DIR}/src)
  target_link_libraries(tensorreg_gpu_host_tests PRIVATE tensorreg_catch_main tensorreg::tensorreg Catch2::Catch2
                                                         tensorreg_cuda_flags)
  # Host code only: nvcc still parses every file once per architecture, and one is enough here.
  set_target_properties(tensorreg_gpu_host_tests PROPERTIES CUDA_ARCHITECTURES 80-real)
  add_test(NAME cuda.host_logic COMMAND tensorreg_gpu_host_tests)
  set_tests_properties(cuda.host_logic PROPERTIES LABELS "cuda")

  # The GPU suite: exits 77 (skipped) when no CUDA device is present.
  # The device memory tests map memory of a child process (IPC handles cannot be opened by
  # the process that exported them): tensorreg_gpu_producer, found next to the test binary
  # (or at $TENSORREG_GPU_PRODUCER). They reuse the engine suite's model helpers.
  add_executable(tensorreg_gpu_producer ${PROJECT_SOURCE_DIR}/tests/cuda/producer.cpp)
  tensorreg_cuda_target(tensorreg_gpu_producer)
  target_link_libraries(tensorreg_gpu_producer PRIVATE tensorreg_gpu_fill CUDA::cudart_static tensorreg_warnings)
  target_include_directories(tensorreg_gpu_producer PRIVATE ${PROJECT_SOURCE_DIR}/src)

  add_executable(tensorreg_gpu_tests
    ${PROJECT_SOURCE_DIR}/tests/cuda/gpu_main.cpp
    ${PROJECT_SOURCE_DIR}/tests/cuda/tree_hash_gpu_tests.cpp
    ${PROJECT_SOURCE_DIR}/tests/cuda/device_memory_tests.cpp
    ${PROJECT_SOURCE_DIR}/tests/cuda/vmm_tests.cpp
    ${PROJECT_SOURCE_DIR}/tests/cuda/producer_process.cpp
    ${PROJECT_SOURCE_DIR}/tests/cuda/bulk_copy_tests.cpp
    ${PROJECT_SOURCE_DIR}/tests/cuda/daemon_devices_tests.cpp
    ${PROJECT_SOURCE_DIR}/tests/cuda/weight_sync_tests.cpp
    ${PROJECT_SOURCE_DIR}/tests/client/cuda_register_gpu_tests.cpp
    ${PROJECT_SOURCE_DIR}/tests/support/engine_helpers.cpp
    ${PROJECT_SOURCE_DIR}/tests/support/daemon_process.cpp
    ${PROJECT_SOURCE_DIR}/tests/support/temp_dir.cpp)
  tensorreg_cuda_target(tensorreg_gpu_tests)
  # gpu_main.cpp holds Catch's implementation (its own main skips without a device): like
  # tensorreg_catch_main, unoptimised and without debug info.
  set_source_files_properties(${PROJECT_SOURCE_DIR}/tests/cuda/gpu_main.cpp PROPERTIES COMPILE_OPTIONS "-O0;-g0")
  # One case drives a real tensorregd (the built one, or $TENSORREGD) through the C++ client.
  target_compile_definitions(tensorreg_gpu_tests PRIVATE TENSORREG_DAEMON_PATH="$<TARGET_FILE:tensorregd>"
                                                         TENSORREG_TEST_DAEMON_WARM_START=1)
  add_dependencies(tensorreg_gpu_tests tensorregd)
  target_include_directories(tensorreg_gpu_tests PRIVATE ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/tests)
  target_link_libraries(tensorreg_gpu_tests PRIVATE tensorreg::cuda tensorreg::tensorreg tensorreg::daemon_core
                                                    tensorreg::client tensorreg_gpu_fill Catch2::Catch2
                                                    tensorreg_warnings)
  add_dependencies(tensorreg_gpu_tests tensorreg_gpu_producer)
  add_test(NAME cuda.gpu COMMAND tensorreg_gpu_tests)
  set_tests_properties(cuda.gpu PROPERTIES SKIP_RETURN_CODE 77 LABELS "cuda;gpu" TIMEOUT 1800)
endif()

# --- the daemon ----------------------------------------------------------------------------
# tensorregd maps client GPU memory when a device is present (daemon/main.cpp, guarded by
# TENSORREG_HAVE_CUDA); without one it runs with no GPU. The runtime is static and reaches the
# driver only at run time, so the binary still starts on a machine with no driver.
target_link_libraries(tensorregd PRIVATE tensorreg_cuda)
target_compile_definitions(tensorregd PRIVATE TENSORREG_HAVE_CUDA=1)

# --- benchmark ---------------------------------------------------------------------------
if(TENSORREG_BUILD_BENCHMARKS)
  add_executable(cuda_tree_hash_bench ${PROJECT_SOURCE_DIR}/benchmarks/cuda_tree_hash_bench.cu)
  tensorreg_cuda_target(cuda_tree_hash_bench)
  target_include_directories(cuda_tree_hash_bench PRIVATE ${PROJECT_SOURCE_DIR}/src)
  target_link_libraries(cuda_tree_hash_bench PRIVATE tensorreg::cuda tensorreg::tensorreg tensorreg_gpu_fill
                                                     tensorreg_cuda_flags)

  # (.cu, like cuda_tree_hash_bench: benchmarks/CMakeLists.txt builds every *_bench.cpp as a CPU
  # benchmark.) First vs cached IPC open, visit() D2H rate vs a plain pinned cudaMemcpy; the memory comes
  # from tensorreg_gpu_producer (built with the tests).
  add_executable(cuda_ipc_bench ${PROJECT_SOURCE_DIR}/benchmarks/cuda_ipc_bench.cu)
  tensorreg_cuda_target(cuda_ipc_bench)
  target_link_libraries(cuda_ipc_bench PRIVATE tensorreg::cuda tensorreg::tensorreg tensorreg_cuda_flags)

  # CUDA VMM imports (fds over SCM_RIGHTS) against IPC opens of the same number of 2 MiB
  # allocations, sequential and on 8 threads, and the address space they reserve; the memory
  # comes from tensorreg_gpu_producer (built with the tests).
  add_executable(cuda_vmm_bench ${PROJECT_SOURCE_DIR}/benchmarks/cuda_vmm_bench.cu
                                ${PROJECT_SOURCE_DIR}/tests/cuda/producer_process.cpp)
  tensorreg_cuda_target(cuda_vmm_bench)
  target_link_libraries(cuda_vmm_bench PRIVATE tensorreg::cuda tensorreg::tensorreg tensorreg_gpu_fill
                                               tensorreg_cuda_flags)

  # GPU → stable DRAM put through the engine (copy_to_host) next to a plain pinned D2H, and the
  # two ways of reaching the memfd (src/cuda/bulk_copy.hpp) side by side.
  add_executable(gpu_stable_put_bench ${PROJECT_SOURCE_DIR}/benchmarks/gpu_stable_put_bench.cu)
  tensorreg_cuda_target(gpu_stable_put_bench)
  target_include_directories(gpu_stable_put_bench PRIVATE ${PROJECT_SOURCE_DIR}/src)
  target_link_libraries(gpu_stable_put_bench PRIVATE tensorreg::cuda tensorreg::tensorreg tensorreg_cuda_flags)

  # LIP registration of a 1 000-tensor state dict: per-storage IPC handles vs one VRAM region
  # per allocation; the producer is this binary itself in its --producer mode (fork + exec).
  add_executable(cuda_lip_bench ${PROJECT_SOURCE_DIR}/benchmarks/cuda_lip_bench.cu)
  tensorreg_cuda_target(cuda_lip_bench)
  target_link_libraries(cuda_lip_bench PRIVATE tensorreg::cuda tensorreg::tensorreg tensorreg_cuda_flags)

  # The copy of a snapshot lease (device_memory_provider::snapshot_to_device) of a 995-tensor,
  # 16 GiB dict next to a plain device-to-device copy of the same bytes in the same run, and the
  # snapshot's batched copy kernel alone (src/cuda/batched_copier.hpp).
  add_executable(cuda_snapshot_bench ${PROJECT_SOURCE_DIR}/benchmarks/cuda_snapshot_bench.cu)
  tensorreg_cuda_target(cuda_snapshot_bench)
  target_include_directories(cuda_snapshot_bench PRIVATE ${PROJECT_SOURCE_DIR}/benchmarks ${PROJECT_SOURCE_DIR}/src)
  target_link_libraries(cuda_snapshot_bench PRIVATE tensorreg::cuda tensorreg::tensorreg tensorreg_cuda_flags)

  # tensorreg::client's register_cuda() (what python/tensorreg/store.py _register_cuda does) on a
  # tensor structure written by python_register_bench.py, its phases timed by the library's
  # cuda_register_report.
  add_executable(cuda_client_register_bench ${PROJECT_SOURCE_DIR}/benchmarks/cuda_client_register_bench.cu)
  tensorreg_cuda_target(cuda_client_register_bench)
  target_link_libraries(cuda_client_register_bench PRIVATE tensorreg::client tensorreg::tensorreg
                                                           CUDA::cudart_static nlohmann_json::nlohmann_json
                                                           tensorreg_cuda_flags)
endif()
