# tests/cluster: the etcd catalogue and the UCX transfers against a real etcd and real UCX
# endpoints on 127.0.0.1 (tensorreg_cluster_tests), and the netns harness (label `cluster`,
# root only).
if(NOT TENSORREG_HAVE_CLUSTER)
  return()
endif()
file(GLOB tensorreg_cluster_unit_tests CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/*_test.cpp)
add_executable(tensorreg_cluster_tests ${tensorreg_cluster_unit_tests}
  ${CMAKE_CURRENT_LIST_DIR}/etcd_process.cpp ${CMAKE_CURRENT_SOURCE_DIR}/support/temp_dir.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/support/child_process.cpp ${CMAKE_CURRENT_SOURCE_DIR}/support/engine_helpers.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/support/two_tensor_artifact.cpp)
# policy_test drives a daemon's dispatcher over a node.
target_link_libraries(tensorreg_cluster_tests PRIVATE tensorreg_catch_main tensorreg::cluster
  tensorreg::daemon_core tensorreg::tensorreg Catch2::Catch2 OpenSSL::Crypto fmt::fmt tensorreg_warnings)
# transfer_server_test speaks raw UCX to the server.
target_link_libraries(tensorreg_cluster_tests PRIVATE PkgConfig::UCX)
target_include_directories(tensorreg_cluster_tests PRIVATE ${CMAKE_CURRENT_SOURCE_DIR} ${PROJECT_SOURCE_DIR}/src)
tensorreg_add_test_files(tensorreg_cluster_tests ${tensorreg_cluster_unit_tests})

# The netns harness (tests/cluster/netns_cluster.sh): root only, SKIP (77) otherwise; label
# `cluster` so that a CI step runs it on its own.
add_test(NAME cluster_netns COMMAND ${CMAKE_CURRENT_LIST_DIR}/netns_cluster.sh ${PROJECT_BINARY_DIR})
set_tests_properties(cluster_netns PROPERTIES LABELS cluster SKIP_RETURN_CODE 77 TIMEOUT 180)
