# packaging/install.cmake — what `cmake --install` adds beyond the binaries and the C++ package
# (those are installed where they are built): the systemd units, the sysusers.d entry for the
# system-wide unit's user, and the documentation. Included from the top-level CMakeLists.txt.
#
# The units name the installed daemon, so they are written at install time, from the prefix the
# install uses (`cmake --install build --prefix P` as well as CMAKE_INSTALL_PREFIX); DESTDIR is
# honoured as by every install rule.

# systemd's own layout, prefix-relative: <prefix>/lib/systemd/{system,user}, never the
# multiarch CMAKE_INSTALL_LIBDIR (systemd does not look there).
set(TENSORREG_SYSTEMD_DIR "lib/systemd" CACHE STRING
    "Where the systemd units go, relative to the install prefix (<dir>/system, <dir>/user)")
set(TENSORREG_SYSUSERS_DIR "lib/sysusers.d" CACHE STRING
    "Where the sysusers.d entry of the system-wide unit's user goes, relative to the install prefix")

foreach(kind system user)
  install(CODE "
    set(TENSORREG_FULL_BINDIR \"\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_BINDIR}\")
    set(TENSORREG_FULL_DOCDIR \"\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_DOCDIR}\")
    configure_file(\"${CMAKE_CURRENT_LIST_DIR}/systemd/${kind}/tensorregd.service.in\"
                   \"${CMAKE_BINARY_DIR}/packaging/${kind}/tensorregd.service\" @ONLY)
    file(INSTALL \"${CMAKE_BINARY_DIR}/packaging/${kind}/tensorregd.service\"
         DESTINATION \"\${CMAKE_INSTALL_PREFIX}/${TENSORREG_SYSTEMD_DIR}/${kind}\")")
endforeach()
install(FILES ${CMAKE_CURRENT_LIST_DIR}/sysusers.d/tensorreg.conf DESTINATION ${TENSORREG_SYSUSERS_DIR})

file(GLOB tensorreg_docs ${PROJECT_SOURCE_DIR}/docs/*.md)
install(FILES ${PROJECT_SOURCE_DIR}/README.md ${PROJECT_SOURCE_DIR}/LICENSE ${tensorreg_docs}
        DESTINATION ${CMAKE_INSTALL_DOCDIR})
install(FILES ${PROJECT_SOURCE_DIR}/python/README.md DESTINATION ${CMAKE_INSTALL_DOCDIR} RENAME python.md)
