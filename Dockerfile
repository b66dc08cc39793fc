# NGC PyTorch image, as the reference recipe; it already carries torch, CUDA and NCCL.
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:24.10-py3
FROM ${FROM_IMAGE_NAME}

WORKDIR /workspace/recommendation
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .

# The data root is /data (mount it: docker run -v /host/data:/data ...); ./data points there, so
# ./prepare_dataset.sh and its default RAW_DIR work unchanged inside the container.
RUN mkdir -p /data && ln -s /data data
