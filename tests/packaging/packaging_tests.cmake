# Packaging (tests/packaging/): what `cmake --install` puts where, a find_package(tensorreg)
# consumer of an installed prefix, systemd-analyze of the units, and the Python wheel in a fresh
# venv. Included from tests/CMakeLists.txt; label "packaging". The install test installs the
# whole build tree, so it needs every installed target built (a plain `cmake --build`).
find_package(Python3 COMPONENTS Interpreter REQUIRED)
add_test(NAME packaging.install
         COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/install_test.py ${PROJECT_BINARY_DIR}
                 ${PROJECT_SOURCE_DIR} ${PROJECT_VERSION} $<IF:$<BOOL:${TENSORREG_HAVE_CUDA}>,ON,OFF>)
set_tests_properties(packaging.install PROPERTIES LABELS packaging TIMEOUT 600)
if(EXISTS /usr/bin/python3)
  add_test(NAME packaging.wheel
           COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/wheel_test.py ${PROJECT_SOURCE_DIR} ${PROJECT_VERSION})
  set_tests_properties(packaging.wheel PROPERTIES LABELS "packaging;python" SKIP_RETURN_CODE 77 TIMEOUT 300)
endif()
