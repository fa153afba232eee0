# Written by grpoctl over vendor/llama.cpp/CMakeLists.txt: llama.cpp's tools (common, quantize, imatrix,
# perplexity, server) compiled from the sdist and linked against the libllama, libggml* and libmtmd that the
# installed llama-cpp-python already compiled from the same sdist. llama.cpp's own top level would build
# ggml and libllama again (most of the compile time); only the code the installed package lacks is built.
cmake_minimum_required(VERSION 3.18)
project("llama.cpp" C CXX)

set(GRPOCTL_LIB_DIR "" CACHE PATH "llama-cpp-python's llama_cpp/lib")
if (NOT EXISTS "${GRPOCTL_LIB_DIR}")
    message(FATAL_ERROR "GRPOCTL_LIB_DIR=${GRPOCTL_LIB_DIR} does not exist")
endif()

set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
list(APPEND CMAKE_MODULE_PATH "${CMAKE_CURRENT_SOURCE_DIR}/cmake/")

# what llama.cpp's top level defines for the subdirectories below (grpoctl passes the sdist's version)
foreach(part MAJOR MINOR PATCH)
    if (NOT DEFINED LLAMA_VERSION_${part})
        set(LLAMA_VERSION_${part} 0)
    endif()
endforeach()
set(LLAMA_VERSION_BASE "${LLAMA_VERSION_MAJOR}.${LLAMA_VERSION_MINOR}.${LLAMA_VERSION_PATCH}")
set(LLAMA_BUILD_COMMON ON)
option(LLAMA_SUBPROCESS "llama-common: use subprocess" ON)
option(LLAMA_BUILD_UI "llama: build the embedded Web UI for server" OFF)
option(LLAMA_USE_PREBUILT_UI "llama: use prebuilt UI from HF Bucket when available" OFF)
include(build-info)
include(common)
include(license)
license_add_file("llama.cpp" "LICENSE")
if (NOT DEFINED LLAMA_BUILD_NUMBER)
    set(LLAMA_BUILD_NUMBER ${BUILD_NUMBER})
endif()
if (NOT DEFINED LLAMA_BUILD_COMMIT)
    set(LLAMA_BUILD_COMMIT ${BUILD_COMMIT})
endif()
find_package(Threads REQUIRED)

# the installed libraries, under the target names llama.cpp's subdirectories link against
foreach(lib ggml-base ggml-cpu ggml llama mtmd)
    set(path "${GRPOCTL_LIB_DIR}/${CMAKE_SHARED_LIBRARY_PREFIX}${lib}${CMAKE_SHARED_LIBRARY_SUFFIX}")
    if (NOT EXISTS "${path}")
        message(FATAL_ERROR "${path} is missing: llama-cpp-python was not built with shared libraries")
    endif()
    add_library(${lib} SHARED IMPORTED GLOBAL)
    set_target_properties(${lib} PROPERTIES IMPORTED_LOCATION "${path}")
endforeach()
set_target_properties(ggml-base PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CMAKE_CURRENT_SOURCE_DIR}/ggml/include"
                                           INTERFACE_COMPILE_DEFINITIONS GGML_SHARED)
set_target_properties(ggml-cpu PROPERTIES INTERFACE_LINK_LIBRARIES ggml-base)
set_target_properties(ggml PROPERTIES INTERFACE_LINK_LIBRARIES "ggml-base;ggml-cpu")
set_target_properties(llama PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CMAKE_CURRENT_SOURCE_DIR}/include"
                                       INTERFACE_COMPILE_DEFINITIONS LLAMA_SHARED INTERFACE_LINK_LIBRARIES ggml)
set_target_properties(mtmd PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CMAKE_CURRENT_SOURCE_DIR}/tools/mtmd"
                                      INTERFACE_LINK_LIBRARIES llama)
# the executables are copied out of the build tree: they find the libraries where the package keeps them
set(CMAKE_BUILD_RPATH "${GRPOCTL_LIB_DIR}")

add_subdirectory(vendor)
add_subdirectory(common)
add_subdirectory(tools/quantize)
add_subdirectory(tools/imatrix)
add_subdirectory(tools/perplexity)
add_subdirectory(tools/ui)
add_subdirectory(tools/server)
