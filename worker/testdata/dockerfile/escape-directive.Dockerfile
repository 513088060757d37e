# syntax=docker/dockerfile:1
# escape=`
FROM mcr.example.com/windows/servercore:ltsc2022
RUN echo one `
    two `
    three
ENV PATHX=C:\tools\bin
COPY . C:\app\
