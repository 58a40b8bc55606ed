# The Python client (python/tensorreg) against the real daemon and CLI; included from
# tests/CMakeLists.txt. Debian's /usr/bin/python3 is the interpreter that sees python3-torch and
# python3-protobuf (scripts/install-deps); a `python3` earlier on the PATH (pyenv) cannot, so
# it is not searched for. Each test file exits 77 (skipped) when torch or protobuf is missing.
set(TENSORREG_PYTHON_TEST_INTERPRETER /usr/bin/python3 CACHE FILEPATH
    "Python with torch and protobuf for the Python client's tests")
if(EXISTS ${TENSORREG_PYTHON_TEST_INTERPRETER})
  foreach(suite layout store device client_modules weight_sync views disk_load)
    add_test(NAME python.${suite}
             COMMAND ${TENSORREG_PYTHON_TEST_INTERPRETER} ${CMAKE_CURRENT_LIST_DIR}/test_${suite}.py
                     --daemon $<TARGET_FILE:tensorregd> --cli $<TARGET_FILE:tensorreg_cli>)
    set_tests_properties(python.${suite} PROPERTIES LABELS "python" SKIP_RETURN_CODE 77 TIMEOUT 300
                         ENVIRONMENT "PYTHONDONTWRITEBYTECODE=1")
  endforeach()
else()
  message(STATUS "${TENSORREG_PYTHON_TEST_INTERPRETER} not found: the Python client's tests are not registered")
endif()

# The committed descriptor set must match the .proto files (regenerate with
# python/tools/regen_descriptors.sh after editing a .proto).
add_test(NAME python.descriptors_current
         COMMAND sh -c "${PROJECT_SOURCE_DIR}/python/tools/regen_descriptors.sh --check ${CMAKE_CURRENT_BINARY_DIR}/descriptors.bin >/dev/null && cmp ${CMAKE_CURRENT_BINARY_DIR}/descriptors.bin ${PROJECT_SOURCE_DIR}/python/tensorreg/_descriptors.bin")

# The committed PTX of the batched copy kernel must match its source (regenerate with
# python/tools/regen_batched_copy_ptx.sh).
find_program(TENSORREG_NVCC nvcc HINTS /usr/local/cuda/bin)
if(TENSORREG_NVCC)
  add_test(NAME python.batched_copy_ptx_current
           COMMAND sh -c "NVCC=${TENSORREG_NVCC} ${PROJECT_SOURCE_DIR}/python/tools/regen_batched_copy_ptx.sh --check ${CMAKE_CURRENT_BINARY_DIR}/batched_copy.ptx >/dev/null && cmp ${CMAKE_CURRENT_BINARY_DIR}/batched_copy.ptx ${PROJECT_SOURCE_DIR}/python/tensorreg/_batched_copy.ptx")
endif()
