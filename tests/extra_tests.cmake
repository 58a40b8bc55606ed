# Suites beyond the Catch2 binary; included from tests/CMakeLists.txt.

# tree_hash_file: prints the data multihash of a file (tests/tools/tree_hash_file.cpp).
add_executable(tree_hash_file ${CMAKE_CURRENT_SOURCE_DIR}/tools/tree_hash_file.cpp)
target_link_libraries(tree_hash_file PRIVATE tensorreg::tensorreg tensorreg_warnings)

# The independent Python reference of the tree hash (hashlib + base64 only) against the tool.
find_package(Python3 COMPONENTS Interpreter)
if(Python3_Interpreter_FOUND)
  add_test(NAME hash.tree_hash_reference
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/hash/tree_hash_reference.py
                   $<TARGET_FILE:tree_hash_file>)
  set_tests_properties(hash.tree_hash_reference PROPERTIES LABELS "hash;python" TIMEOUT 600)
else()
  message(STATUS "python3 not found: hash.tree_hash_reference is not registered")
endif()

# The daemon's metrics listener scraped and read by Prometheus' own text parser (Debian's
# python3-prometheus-client in /usr/bin/python3; the test exits 77, skipped, without it).
if(EXISTS /usr/bin/python3)
  add_test(NAME metrics.scrape
           COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/metrics/metrics_scrape_test.py
                   $<TARGET_FILE:tensorregd> $<TARGET_FILE:tensorreg_cli>)
  set_tests_properties(metrics.scrape PROPERTIES LABELS "metrics;python" SKIP_RETURN_CODE 77 TIMEOUT 120)
endif()
