# One module = one folder = one library target, made here.
#
#   dserve_add_module(<name> SOURCES <files...> [DEPS <public deps...>] [PRIVATE_DEPS <deps...>])
#
# Creates `dserve_<name>` (alias `dserve::<name>`). Public headers live in
# `<folder>/include/dserve/<name>/`; everything under `<folder>/src/` is internal.
# Warnings (as errors) apply to our own code only, through `dserve_warnings`.

add_library(dserve_warnings INTERFACE)
target_compile_options(dserve_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
  -Wold-style-cast -Wcast-align -Woverloaded-virtual -Wnull-dereference -Werror>)

function(dserve_add_module name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(dserve_${name} STATIC ${ARG_SOURCES})
  add_library(dserve::${name} ALIAS dserve_${name})
  target_include_directories(dserve_${name}
    PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include
    PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_link_libraries(dserve_${name} PUBLIC ${ARG_DEPS} PRIVATE dserve_warnings ${ARG_PRIVATE_DEPS})
  set_target_properties(dserve_${name} PROPERTIES POSITION_INDEPENDENT_CODE ON)
endfunction()

# A test executable registered with CTest; `LABELS` become CTest labels.
function(dserve_add_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT;TEST_PREFIX" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main dserve_warnings)
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  gtest_discover_tests(${name}
    TEST_PREFIX "${ARG_TEST_PREFIX}"
    PROPERTIES TIMEOUT ${ARG_TIMEOUT} LABELS "${ARG_LABELS}"
    DISCOVERY_TIMEOUT 60)
endfunction()
