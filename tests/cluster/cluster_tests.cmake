# tests/cluster: the etcd catalogue and the UCX transfers against a real etcd and real UCX
# endpoints on 127.0.0.1 (tensorreg_cluster_tests), and the netns harness (label `cluster`,
# root only).
if(NOT TENSORREG_HAVE_CLUSTER)
  return()
endif()
file(GLOB tensorreg_cluster_unit_tests CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/*_test.cpp)
add_executable(tensorreg_cluster_tests ${tensorreg_cluster_unit_tests}
  ${CMAKE_CURRENT_LIST_DIR}/etcd_process.cpp ${CMAKE_CURRENT_SOURCE_DIR}/support/temp_dir.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/support/child_process.cpp)
target_link_libraries(tensorreg_cluster_tests PRIVATE tensorreg_catch_main tensorreg::cluster
  tensorreg::tensorreg fmt::fmt tensorreg_warnings)
target_include_directories(tensorreg_cluster_tests PRIVATE ${CMAKE_CURRENT_SOURCE_DIR} ${PROJECT_SOURCE_DIR}/src)
catch_discover_tests(tensorreg_cluster_tests EXTRA_ARGS --warn NoTests)
